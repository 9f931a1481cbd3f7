// The Tutti app (served at /): sign-in, chat rooms, presence and contacts,
// notifications and shared documents, on the `Tutti` connection (src/tutti.ts).

import { TuttiError, fetchCertificateHashes } from "./client";
import { ContactState, PresenceStatus, Tutti } from "./tutti";
import type { ChatMessage, Notification, PresenceState, RoomInvite, RoomSummary, StateChange } from "./tutti";
import { devToken, serverInfo, webTransportUrl } from "./server-api";
import { DocsView } from "./app-docs";

function el<T extends HTMLElement = HTMLElement>(id: string): T {
  const found = document.getElementById(id);
  if (!found) throw new Error(`#${id} missing from the page`);
  return found as T;
}

function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  props: Record<string, string> = {},
  ...children: Array<Node | string>
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

function describe(err: unknown): string {
  return err instanceof TuttiError ? err.toString() : err instanceof Error ? err.message : String(err);
}

let toastTimer: ReturnType<typeof setTimeout> | undefined;
/** Shows an error for a few seconds. */
export function showError(err: unknown): void {
  const box = el("app-error");
  box.textContent = describe(err);
  box.hidden = false;
  if (toastTimer) clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (box.hidden = true), 6000);
}

const STATUS_NAMES: Record<number, string> = {
  [PresenceStatus.ONLINE]: "online",
  [PresenceStatus.AWAY]: "away",
  [PresenceStatus.DO_NOT_DISTURB]: "dnd",
  [PresenceStatus.OFFLINE]: "offline",
};
const STATUS_VALUES: Record<string, PresenceStatus> = {
  online: PresenceStatus.ONLINE,
  away: PresenceStatus.AWAY,
  dnd: PresenceStatus.DO_NOT_DISTURB,
};

/** How long a typing indicator stays without a refresh, in ms. */
const TYPING_SHOWN_MS = 4000;
/** How long after the last keystroke the user counts as typing, in ms. */
const TYPING_IDLE_MS = 2500;
const HISTORY_PAGE = 30;

interface RoomState {
  summary: RoomSummary;
  lastOffset: bigint;
  readOffset: bigint;
  lastMessage?: ChatMessage;
}

class App {
  readonly tutti: Tutti;
  readonly me: string;
  private readonly rooms = new Map<string, RoomState>();
  private openRoom?: string;
  private readonly shown = new Map<bigint, HTMLLIElement>();
  private oldestShown?: bigint;
  private moreHistory = false;
  private loadingHistory = false;
  /** Other people's read marks in the open room (from receipts). */
  private readonly readMarks = new Map<string, bigint>();
  private readonly typers = new Map<string, ReturnType<typeof setTimeout>>();
  private typingIdle?: ReturnType<typeof setTimeout>;
  private readonly presence = new Map<string, string>();
  private readonly notifications = new Map<string, Notification>();
  private unreadNotifications = 0n;
  private readonly docs: DocsView;

  constructor(tutti: Tutti, me: string) {
    this.tutti = tutti;
    this.me = me;
    this.docs = new DocsView(tutti, me, (open) => this.showView(open ? "doc" : "empty"), showError);
    this.wire();
  }

  // --------------------------------------------------------------- shell

  private wire(): void {
    const t = this.tutti;
    t.onState((s) => this.onState(s));
    t.onMessage((m) => this.onMessage(m));
    t.onReadReceipt((r) => {
      const room = this.rooms.get(r.roomId);
      if (r.userId === this.me) {
        if (room && r.offset > room.readOffset) room.readOffset = r.offset;
        this.renderRooms();
      } else if (r.roomId === this.openRoom) {
        const prev = this.readMarks.get(r.userId) ?? 0n;
        if (r.offset > prev) this.readMarks.set(r.userId, r.offset);
        this.renderReceipt();
      }
    });
    t.onRoomEvent(() => void this.loadRooms());
    t.onInvite(() => void this.loadInvites().catch(showError));
    t.onTyping((ty) => this.onTyping(ty.roomId, ty.userId, ty.typing));
    t.onPresence((p) => this.setPresence(p));
    t.onContactEvent(() => void this.loadContacts());
    t.onNotification((n) => {
      if (this.notifications.has(n.notificationId)) return;
      this.notifications.set(n.notificationId, n);
      if (!n.read) this.unreadNotifications++;
      this.renderNotifications();
    });
    t.onNotificationsRead((r) => {
      for (const n of this.notifications.values()) {
        if (r.all || r.notificationIds.includes(n.notificationId)) n.read = true;
      }
      this.unreadNotifications = r.unread;
      this.renderNotifications();
    });

    for (const tab of ["chats", "people", "docs"]) {
      el(`tab-${tab}`).addEventListener("click", () => this.selectTab(tab));
    }
    el("back").addEventListener("click", () => this.closeRoom());
    el("doc-back").addEventListener("click", () => this.docs.close());

    el<HTMLFormElement>("new-room-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const name = el<HTMLInputElement>("new-room-name");
      const people = el<HTMLInputElement>("new-room-people");
      const ids = people.value.split(/[\s,]+/).filter(Boolean);
      t.createRoom(name.value.trim(), ids)
        .then(async (room) => {
          name.value = "";
          people.value = "";
          await this.loadRooms();
          await this.showRoom(room.roomId);
        })
        .catch(showError);
    });
    el<HTMLFormElement>("room-add-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const input = el<HTMLInputElement>("room-add-user");
      if (!this.openRoom) return;
      t.addToRoom(this.openRoom, input.value.trim())
        .then((room) => {
          input.value = "";
          const state = this.rooms.get(room.roomId);
          if (state) state.summary.room = room;
          this.renderMembers();
        })
        .catch(showError);
    });

    const composer = el<HTMLInputElement>("composer-input");
    el<HTMLFormElement>("composer").addEventListener("submit", (e) => {
      e.preventDefault();
      const text = composer.value;
      const roomId = this.openRoom;
      if (!text.trim() || !roomId) return;
      composer.value = "";
      this.stopTyping();
      t.sendMessage(roomId, text)
        .then((m) => this.onMessage(m))
        .catch((err) => {
          composer.value = text;
          showError(err);
        });
    });
    composer.addEventListener("input", () => {
      if (!this.openRoom) return;
      if (!composer.value) {
        this.stopTyping();
        return;
      }
      t.setTyping(this.openRoom, true);
      if (this.typingIdle) clearTimeout(this.typingIdle);
      this.typingIdle = setTimeout(() => this.stopTyping(), TYPING_IDLE_MS);
    });

    const scroller = el("scroller");
    scroller.addEventListener("scroll", () => {
      if (scroller.scrollTop < 40) void this.loadOlder();
      if (this.atBottom()) this.markOpenRoomRead();
    });
    document.addEventListener("visibilitychange", () => this.markOpenRoomRead());

    const bell = el<HTMLButtonElement>("bell");
    bell.addEventListener("click", () => {
      const panel = el("notif-panel");
      panel.hidden = !panel.hidden;
      bell.setAttribute("aria-expanded", String(!panel.hidden));
    });
    el("notif-mark-all").addEventListener("click", () => {
      t.markAllNotificationsRead()
        .then((r) => {
          for (const n of this.notifications.values()) n.read = true;
          this.unreadNotifications = r.unread;
          this.renderNotifications();
        })
        .catch(showError);
    });
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape" && !el("notif-panel").hidden) {
        el("notif-panel").hidden = true;
        bell.setAttribute("aria-expanded", "false");
        bell.focus();
      }
    });

    const status = el<HTMLSelectElement>("status-select");
    status.addEventListener("change", () => {
      t.setStatus(STATUS_VALUES[status.value]!)
        .then((p) => this.setPresence(p))
        .catch(showError);
    });

    el<HTMLFormElement>("contact-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const input = el<HTMLInputElement>("contact-user");
      t.requestContact(input.value.trim())
        .then(() => {
          input.value = "";
          return this.loadContacts();
        })
        .catch(showError);
    });
  }

  private onState(s: StateChange): void {
    const conn = el("conn");
    conn.dataset["state"] = s.state;
    conn.textContent =
      s.state === "reconnecting" ? `reconnecting (attempt ${s.attempt})` : s.state === "disconnected" && s.error ? `disconnected: ${s.error.name}` : s.state;
    el<HTMLSelectElement>("status-select").disabled = s.state !== "connected";
    el<HTMLButtonElement>("bell").disabled = s.state !== "connected" && this.notifications.size === 0;
    if (s.state === "connected") void this.refresh();
    if (s.state === "disconnected" && s.error) showError(s.error);
  }

  /** Loads everything after each (re)connect: missed pushes arrive on their own. */
  private async refresh(): Promise<void> {
    try {
      await Promise.all([this.loadRooms(), this.loadInvites(), this.loadNotifications(), this.loadContacts()]);
      if (this.openRoom) this.markOpenRoomRead();
    } catch (err) {
      showError(err);
    }
  }

  private selectTab(tab: string): void {
    for (const name of ["chats", "people", "docs"]) {
      el(`tab-${name}`).setAttribute("aria-selected", String(name === tab));
      el(`pane-${name}`).hidden = name !== tab;
    }
    if (tab === "docs") this.docs.renderList();
  }

  private showView(view: "room" | "doc" | "empty"): void {
    el("room-view").hidden = view !== "room";
    el("doc-view").hidden = view !== "doc";
    el("empty-view").hidden = view !== "empty";
    el("app").classList.toggle("open", view !== "empty");
    if (view !== "room") this.openRoom = undefined;
  }

  // --------------------------------------------------------------- rooms

  private async loadRooms(): Promise<void> {
    const list = await this.tutti.rooms();
    for (const s of list) {
      const id = s.room!.roomId;
      const known = this.rooms.get(id);
      const last = s.room!.lastOffset;
      // Resume this room after reconnects (from here, if it is new to this page).
      this.tutti.trackStream(`room/${id}`, last);
      if (known) {
        known.summary = s;
        if (last > known.lastOffset) {
          known.lastOffset = last;
          known.lastMessage = s.lastMessage;
        }
        if (s.readOffset > known.readOffset) known.readOffset = s.readOffset;
      } else {
        this.rooms.set(id, { summary: s, lastOffset: last, readOffset: s.readOffset, lastMessage: s.lastMessage });
      }
    }
    const ids = new Set(list.map((s) => s.room!.roomId));
    for (const id of [...this.rooms.keys()]) if (!ids.has(id)) this.rooms.delete(id);
    if (this.openRoom && !ids.has(this.openRoom)) this.closeRoom(); // removed or left
    if (this.openRoom) this.renderMembers();
    this.renderRooms();
    await this.loadPresence();
  }

  private unread(room: RoomState): bigint {
    const n = room.lastOffset - room.readOffset;
    return n > 0n ? n : 0n;
  }

  private renderRooms(): void {
    const list = el("room-list");
    const rooms = [...this.rooms.values()].sort((a, b) =>
      Number((b.lastMessage?.sentAtMs ?? 0n) - (a.lastMessage?.sentAtMs ?? 0n)),
    );
    list.replaceChildren(
      ...rooms.map((r) => {
        const room = r.summary.room!;
        const unread = this.unread(r);
        const badge = h("span", { class: "badge room-unread", "data-count": String(unread), text: String(unread) });
        badge.hidden = unread === 0n;
        const last = r.lastMessage ? `${r.lastMessage.senderId}: ${r.lastMessage.text}` : "No messages yet";
        const button = h(
          "button",
          { type: "button", class: "item", "aria-label": `${room.name || room.roomId}, ${unread} unread` },
          h("span", { class: "room-name", text: room.name || room.roomId }),
          badge,
          h("span", { class: "room-last", text: last }),
        );
        button.addEventListener("click", () => void this.showRoom(room.roomId).catch(showError));
        const item = h("li", { class: "room", "data-room": room.roomId }, button);
        if (room.roomId === this.openRoom) item.setAttribute("aria-current", "true");
        return item;
      }),
    );
  }

  private async showRoom(roomId: string): Promise<void> {
    this.docs.close();
    this.showView("room");
    this.openRoom = roomId;
    this.shown.clear();
    this.readMarks.clear();
    for (const timer of this.typers.values()) clearTimeout(timer);
    this.typers.clear();
    el("messages").replaceChildren();
    el("typing").textContent = "";
    el("receipt").textContent = "";
    const room = this.rooms.get(roomId);
    el("room-title").textContent = room?.summary.room?.name || roomId;
    this.renderMembers();
    this.renderRooms();
    const page = await this.tutti.history(roomId, 0n, HISTORY_PAGE);
    if (this.openRoom !== roomId) return;
    this.moreHistory = page.more;
    this.oldestShown = page.messages[0]?.offset;
    for (const m of page.messages) this.onMessage(m);
    this.renderHistoryStatus();
    this.scrollToBottom();
    this.markOpenRoomRead();
    el("composer-input").focus();
  }

  private closeRoom(): void {
    this.stopTyping();
    this.showView("empty");
    this.renderRooms();
  }

  // --------------------------------------------------------------- invitations

  /** Shows the user's pending invitations, each with Accept and Decline. */
  private async loadInvites(): Promise<void> {
    const invites = await this.tutti.invites();
    const list = el("invite-list");
    list.hidden = invites.length === 0;
    list.replaceChildren(...invites.map((i) => this.inviteItem(i)));
  }

  private inviteItem(i: RoomInvite): HTMLElement {
    const accept = h("button", { type: "button", class: "invite-accept", text: "Accept" });
    const decline = h("button", { type: "button", class: "invite-decline", text: "Decline" });
    accept.addEventListener("click", () => {
      this.tutti
        .acceptInvite(i.roomId)
        .then(() => Promise.all([this.loadRooms(), this.loadInvites()]))
        .catch(showError);
    });
    decline.addEventListener("click", () => {
      this.tutti.declineInvite(i.roomId).then(() => this.loadInvites()).catch(showError);
    });
    return h(
      "li",
      { class: "invite", "data-room": i.roomId },
      h("span", { class: "name", text: `${i.inviterId} invites you to ${i.name || i.roomId}` }),
      accept,
      decline,
    );
  }

  private renderMembers(): void {
    const room = this.openRoom ? this.rooms.get(this.openRoom)?.summary.room : undefined;
    const people = room?.participants ?? [];
    const invited = (room?.invitees ?? []).map((u) =>
      h("li", { class: "member invited", "data-user": u, "data-invited": "true" }, h("span", { text: `${u} (invited)` })),
    );
    el("members").replaceChildren(
      ...invited,
      ...people.map((u) => {
        const status = u === this.me ? el("my-dot").dataset["status"] ?? "online" : this.presence.get(u) ?? "offline";
        return h(
          "li",
          { class: "member", "data-user": u },
          h("span", { class: "dot", "data-status": status, "aria-hidden": "true" }),
          h("span", { text: u }),
          h("span", { class: "sr-only", text: `(${status})` }),
        );
      }),
    );
  }

  private onMessage(m: ChatMessage): void {
    const room = this.rooms.get(m.roomId);
    if (room) {
      if (m.offset > room.lastOffset) {
        room.lastOffset = m.offset;
        room.lastMessage = m;
      }
      // Sending a message moves the sender's read mark to it.
      if (m.senderId === this.me && m.offset > room.readOffset) room.readOffset = m.offset;
    } else {
      void this.loadRooms().catch(showError);
    }
    if (m.roomId === this.openRoom) {
      this.typingStopped(m.senderId);
      this.showMessage(m);
      this.markOpenRoomRead();
    }
    this.renderRooms();
  }

  private showMessage(m: ChatMessage): void {
    if (this.shown.has(m.offset)) return;
    const stick = this.atBottom();
    const time = new Date(Number(m.sentAtMs)).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    const item = h(
      "li",
      { class: m.system ? "msg system" : "msg", "data-offset": String(m.offset), "data-id": m.messageId },
      h("span", { class: "msg-sender", text: m.senderId }),
      h("span", { class: "msg-text", text: m.text }),
      h("time", { class: "msg-time", datetime: new Date(Number(m.sentAtMs)).toISOString(), text: time }),
    );
    // Keep the list ordered by offset, whatever order pages and pushes come in.
    const list = el("messages");
    let before: HTMLLIElement | undefined;
    for (const [offset, node] of this.shown) {
      if (offset > m.offset && (!before || offset < BigInt(before.dataset["offset"]!))) before = node;
    }
    list.insertBefore(item, before ?? null);
    this.shown.set(m.offset, item);
    if (this.oldestShown === undefined || m.offset < this.oldestShown) this.oldestShown = m.offset;
    if (stick) this.scrollToBottom();
    this.renderReceipt();
    if (!this.loadingHistory) this.renderHistoryStatus();
  }

  private async loadOlder(): Promise<void> {
    const roomId = this.openRoom;
    if (!roomId || !this.moreHistory || this.loadingHistory || this.oldestShown === undefined) return;
    this.loadingHistory = true;
    this.renderHistoryStatus();
    const scroller = el("scroller");
    const fromBottom = scroller.scrollHeight - scroller.scrollTop;
    try {
      const page = await this.tutti.history(roomId, this.oldestShown, HISTORY_PAGE);
      if (this.openRoom !== roomId) return;
      this.moreHistory = page.more;
      for (const m of page.messages) this.showMessage(m);
      scroller.scrollTop = scroller.scrollHeight - fromBottom; // keep the view still
    } catch (err) {
      showError(err);
    } finally {
      this.loadingHistory = false;
      this.renderHistoryStatus();
    }
  }

  private renderHistoryStatus(): void {
    el("history-status").textContent = this.loadingHistory
      ? "Loading older messages…"
      : this.moreHistory
        ? "Scroll up for older messages"
        : this.shown.size
          ? "Start of the conversation"
          : "No messages yet";
  }

  private atBottom(): boolean {
    const s = el("scroller");
    return s.scrollHeight - s.scrollTop - s.clientHeight < 30;
  }

  private scrollToBottom(): void {
    const s = el("scroller");
    s.scrollTop = s.scrollHeight;
  }

  private markOpenRoomRead(): void {
    const roomId = this.openRoom;
    const room = roomId ? this.rooms.get(roomId) : undefined;
    if (!roomId || !room || document.visibilityState !== "visible" || this.tutti.state !== "connected") return;
    if (room.readOffset >= room.lastOffset) return;
    const offset = room.lastOffset;
    room.readOffset = offset;
    this.renderRooms();
    this.tutti
      .markRead(roomId, offset)
      .then((r) => {
        if (r.readOffset > room.readOffset) room.readOffset = r.readOffset;
        this.renderRooms();
      })
      .catch(showError);
  }

  private renderReceipt(): void {
    // "Seen by ..." under the user's newest message that others have read.
    let mine: bigint | undefined;
    for (const [offset, node] of this.shown) {
      if (node.querySelector(".msg-sender")?.textContent === this.me && (mine === undefined || offset > mine)) mine = offset;
    }
    const seen = mine === undefined ? [] : [...this.readMarks].filter(([, o]) => o >= mine!).map(([u]) => u).sort();
    el("receipt").textContent = seen.length ? `Seen by ${seen.join(", ")}` : "";
  }

  // -------------------------------------------------------------- typing

  private stopTyping(): void {
    if (this.typingIdle) clearTimeout(this.typingIdle);
    this.typingIdle = undefined;
    if (this.openRoom) this.tutti.setTyping(this.openRoom, false);
  }

  private onTyping(roomId: string, userId: string, typing: boolean): void {
    if (roomId !== this.openRoom || userId === this.me) return;
    if (!typing) {
      this.typingStopped(userId);
      return;
    }
    const old = this.typers.get(userId);
    if (old) clearTimeout(old);
    this.typers.set(userId, setTimeout(() => this.typingStopped(userId), TYPING_SHOWN_MS));
    this.renderTyping();
  }

  private typingStopped(userId: string): void {
    const timer = this.typers.get(userId);
    if (timer === undefined) return;
    clearTimeout(timer);
    this.typers.delete(userId);
    this.renderTyping();
  }

  private renderTyping(): void {
    const who = [...this.typers.keys()].sort();
    el("typing").textContent =
      who.length === 0 ? "" : `${who.join(", ")} ${who.length === 1 ? "is" : "are"} typing…`;
  }

  // ------------------------------------------------------------ presence

  private async loadPresence(): Promise<void> {
    const people = new Set<string>();
    for (const r of this.rooms.values()) for (const p of r.summary.room?.participants ?? []) people.add(p);
    people.delete(this.me);
    const ids = [...people].slice(0, 100);
    if (!ids.length) return;
    const states = await this.tutti.presence(ids);
    for (const s of states) this.setPresence(s);
  }

  private setPresence(p: PresenceState): void {
    const status = STATUS_NAMES[p.status] ?? "offline";
    if (p.userId === this.me) {
      el("my-dot").dataset["status"] = status;
      const select = el<HTMLSelectElement>("status-select");
      if (status !== "offline") select.value = status;
    } else {
      this.presence.set(p.userId, status);
    }
    for (const dot of document.querySelectorAll<HTMLElement>(`[data-user="${CSS.escape(p.userId)}"] .dot`)) {
      dot.dataset["status"] = status;
    }
    for (const label of document.querySelectorAll<HTMLElement>(`[data-user="${CSS.escape(p.userId)}"] .sr-only`)) {
      label.textContent = `(${status})`;
    }
  }

  private async loadContacts(): Promise<void> {
    const contacts = await this.tutti.contacts();
    for (const c of contacts) if (c.presence) this.setPresence(c.presence);
    el("contact-list").replaceChildren(
      ...contacts.map((c) => {
        const status = c.state === ContactState.ACCEPTED ? this.presence.get(c.userId) ?? "offline" : "none";
        const note =
          c.state === ContactState.REQUESTED ? "requested" : c.state === ContactState.INCOMING ? "wants to connect" : "";
        const item = h(
          "li",
          { class: "contact", "data-user": c.userId, "data-state": ContactState[c.state] ?? "" },
          h("span", { class: "dot", "data-status": status, "aria-hidden": "true" }),
          h("span", { class: "name", text: c.userId }),
          h("span", { class: "sr-only", text: `(${status})` }),
          h("span", { class: "muted small", text: note }),
        );
        if (c.state === ContactState.INCOMING) {
          const accept = h("button", { type: "button", class: "accept", text: "Accept", "aria-label": `Accept ${c.userId}` });
          accept.addEventListener("click", () => void this.tutti.acceptContact(c.userId).then(() => this.loadContacts()).catch(showError));
          item.append(accept);
        }
        const remove = h("button", { type: "button", class: "remove", text: "Remove", "aria-label": `Remove ${c.userId}` });
        remove.addEventListener("click", () => void this.tutti.removeContact(c.userId).then(() => this.loadContacts()).catch(showError));
        item.append(remove);
        return item;
      }),
    );
  }

  // ------------------------------------------------------- notifications

  private async loadNotifications(): Promise<void> {
    const page = await this.tutti.notifications(0n, 50);
    for (const n of page.notifications) this.notifications.set(n.notificationId, n);
    this.unreadNotifications = page.unread;
    this.renderNotifications();
  }

  private renderNotifications(): void {
    const count = this.unreadNotifications;
    const badge = el("bell-count");
    badge.textContent = String(count);
    badge.dataset["count"] = String(count);
    badge.hidden = count === 0n;
    el("bell-label").textContent = `Notifications, ${count} unread`;
    el<HTMLButtonElement>("bell").disabled = false;
    const items = [...this.notifications.values()].sort((a, b) => Number(b.offset - a.offset));
    el("notif-empty").hidden = items.length > 0;
    el("notif-list").replaceChildren(
      ...items.map((n) => {
        const item = h(
          "li",
          { class: "notif", "data-id": n.notificationId, "data-read": String(n.read) },
          h(
            "div",
            { class: "body" },
            h("div", { class: "title", text: n.title || n.kind }),
            h("div", { class: "muted", text: n.body }),
            h("time", { class: "muted small", text: new Date(Number(n.createdAtMs)).toLocaleString() }),
          ),
        );
        if (!n.read) {
          const mark = h("button", { type: "button", class: "mark-read", text: "Mark read", "aria-label": `Mark “${n.title}” read` });
          mark.addEventListener("click", () => {
            this.tutti
              .markNotificationsRead([n.notificationId])
              .then((r) => {
                n.read = true;
                this.unreadNotifications = r.unread;
                this.renderNotifications();
              })
              .catch(showError);
          });
          item.append(mark);
        }
        return item;
      }),
    );
  }
}

// ------------------------------------------------------------------ start

function tokenFromFragment(): string | null {
  const params = new URLSearchParams(location.hash.replace(/^#/, ""));
  const token = params.get("token");
  return token && token.trim() ? token.trim() : null;
}

/** The user id in a JWT's `sub` claim (for display until Welcome arrives). */
function subject(token: string): string {
  try {
    const payload = token.split(".")[1] ?? "";
    const json = atob(payload.replace(/-/g, "+").replace(/_/g, "/"));
    return (JSON.parse(json) as { sub?: string }).sub ?? "";
  } catch {
    return "";
  }
}

function start(token: string): void {
  el("signin").hidden = true;
  el("app").hidden = false;
  const me = subject(token);
  el("me").hidden = false;
  el("me-name").textContent = me;
  const tutti = new Tutti({
    url: async () => webTransportUrl(await serverInfo()),
    token,
    // Fetched before every attempt: the server may have rotated its certificate.
    certificateHashes: () => fetchCertificateHashes(location.origin).catch(() => []),
  });
  const app = new App(tutti, me);
  // Leaving the page ends the session at once (others see the user leave after the
  // server's grace period, not after an idle timeout).
  addEventListener("pagehide", (e) => {
    if (!e.persisted) tutti.close();
  });
  (window as unknown as { tuttiApp: unknown }).tuttiApp = { tutti, app };
}

function signIn(): void {
  el("signin").hidden = false;
  const form = el<HTMLFormElement>("signin-form");
  const name = el<HTMLInputElement>("signin-name");
  name.focus();
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const user = name.value.trim();
    if (!user) return;
    el<HTMLButtonElement>("signin-submit").disabled = true;
    devToken(user, { noDevMode: "This server needs a token: open the page with #token=…" })
      .then((token) => {
        history.replaceState(null, "", `#token=${encodeURIComponent(token)}`);
        start(token);
      })
      .catch((err: unknown) => {
        el<HTMLButtonElement>("signin-submit").disabled = false;
        el("signin-error").textContent = describe(err);
      });
  });
}

const token = tokenFromFragment();
if (token) start(token);
else signIn();
