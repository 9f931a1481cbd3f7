// Tutti: a connection to a Tutti server that stays up. It wraps one TuttiClient
// session at a time, reconnects with full-jitter exponential backoff after every
// close whose code says "reconnect" (and after network loss), never after a "stop"
// code, resumes rooms and notifications by offset (so each missed event reaches the
// application exactly once) and offers one typed promise per request of the protocol.
// In a cluster it keeps the node list of every Welcome and reconnects to the nodes
// of that list (the power of two choices, then down the list), follows a REDIRECT
// once and honours a draining node's GOING_AWAY (its retry-after and its list).
//
//   const tutti = new Tutti({ url, token, certificateHashes });
//   tutti.onState((s) => console.log(s.state));
//   tutti.onMessage((m) => console.log(m.senderId, m.text));
//   await tutti.connected();
//   await tutti.sendMessage("general", "hello");

import { GOING_AWAY, REDIRECT, TuttiClient, TuttiError, failoverOrder, optionsForNode } from "./client";
import type {
  ClusterNode,
  ConnectOptions,
  Datagram,
  MetricsSubscribeResponse,
  MetricsSubscription,
  MetricsUpdate,
  Push,
  RequestBody,
  RequestCase,
  Answer,
  WebTransportFactory,
} from "./client";
import type {
  ChatMessage,
  ChatReadReceipt,
  ChatTyping,
  Room,
  RoomEvent,
  RoomInvite,
  RoomSummary,
} from "./gen/tutti/v1/chat_pb";
import type { Notification, NotificationsRead } from "./gen/tutti/v1/notify_pb";
import type { AnalyticsSeriesResponse, AnalyticsTopResponse } from "./gen/tutti/v1/analytics_pb";
import { ContactState, PresenceStatus } from "./gen/tutti/v1/presence_pb";
import type { Contact, ContactEvent, PresenceState } from "./gen/tutti/v1/presence_pb";
import { DocRole } from "./gen/tutti/v1/collab_pb";
import { TuttiDocument } from "./document";
import type { DocCursor, DocOpenResponse, DocOperation, DocPresence, DocShared, DocSummary } from "./gen/tutti/v1/collab_pb";

export { ContactState, DocRole, PresenceStatus, TuttiDocument };
export type { DocumentChange, RemoteParticipant } from "./document";
export type {
  ChatMessage,
  ChatReadReceipt,
  ChatTyping,
  Contact,
  ContactEvent,
  DocCursor,
  DocOpenResponse,
  DocOperation,
  DocPresence,
  DocShared,
  DocSummary,
  Notification,
  NotificationsRead,
  PresenceState,
  Room,
  RoomEvent,
  RoomInvite,
  RoomSummary,
};

/** The connection's state. */
export type ConnectionState = "connecting" | "connected" | "reconnecting" | "disconnected";

/** A state change, as given to `onState` listeners. */
export interface StateChange {
  state: ConnectionState;
  /** Why the previous session ended (reconnecting, disconnected). */
  error?: TuttiError;
  /** Reconnecting: the attempt number (1, 2, ...) and the delay before it, in ms. */
  attempt?: number;
  delayMs?: number;
  /** Connected: the server node and how many times this connection was re-established. */
  nodeId?: string;
  reconnects?: number;
}

/** Timers, injectable so that tests run on virtual time. */
export interface Clock {
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

const realClock: Clock = {
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (h) => clearTimeout(h as ReturnType<typeof setTimeout>),
};

/** Reconnect policy: full-jitter exponential backoff. */
export interface BackoffOptions {
  /** The first ceiling, in ms (default 500). */
  baseMs?: number;
  /** The largest ceiling, in ms (default 30000). */
  maxMs?: number;
}

/**
 * A new client message id for a chat send: 32 hex digits, the time first.
 * `nowMs` is the time it starts with (default: this device's clock); `Tutti`
 * passes the server's clock as its last Welcome gave it.
 */
export function newClientMessageId(nowMs: number = Date.now()): string {
  // 12 hex digits of the Unix time in milliseconds, then 80 random bits: the
  // server keeps its idempotency records in id order, and ids that start with the
  // time are stored next to each other, at less cost than random ones. Taken from
  // the server's clock, they line up with other clients' whatever this device's
  // clock says.
  const time = (Math.floor(nowMs) % 2 ** 48).toString(16).padStart(12, "0");
  const bytes = new Uint8Array(10);
  globalThis.crypto.getRandomValues(bytes);
  return time + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * Whether a failed session or attempt is worth another: a server close reconnects
 * unless its code says stop (3500-3999); a client-side failure (network loss,
 * timeout) when the error says so.
 */
function shouldRetry(err: TuttiError): boolean {
  return err.source === "server" ? !(err.code >= 3500 && err.code < 4000) : err.reconnect;
}

/** ErrorCode UNAVAILABLE: storage failed, nothing was stored; retry with backoff. */
const UNAVAILABLE = 111;

/**
 * Whether a chat send that failed with `err` may be retried (with the same client
 * message id): storage was unavailable, or the session ended before the answer
 * with a reason to reconnect.
 */
export function isRetryableSend(err: unknown): boolean {
  if (!(err instanceof TuttiError)) return false;
  return err.code === UNAVAILABLE || err.reconnect;
}

/**
 * The delay before reconnect attempt `attempt` (1, 2, ...): uniform in
 * [0, min(maxMs, baseMs * 2^(attempt-1))) ("full jitter"), so that many clients
 * dropped at once do not come back at once.
 */
export function backoffDelay(attempt: number, options: BackoffOptions = {}, random: () => number = Math.random): number {
  const base = options.baseMs ?? 500;
  const max = options.maxMs ?? 30_000;
  const ceiling = Math.min(max, base * 2 ** Math.max(0, attempt - 1));
  return Math.floor(random() * ceiling);
}

type Lazy<T> = T | (() => T | Promise<T>);

async function resolveLazy<T>(value: Lazy<T>): Promise<T> {
  return typeof value === "function" ? await (value as () => T | Promise<T>)() : value;
}

export interface TuttiOptions {
  /**
   * The WebTransport URL(s) of the server's nodes ("https://127.0.0.1:4433/tutti").
   * After a failed attempt the next one in the list is tried. A function is called
   * before every attempt at one of them.
   *
   * Once a session's Welcome has listed the nodes of a cluster (`nodes`), reconnects
   * go to those nodes instead: the less loaded of two taken at random, then the
   * others, fewest sessions first, at once, one after another; the configured URL
   * (the next one each round) is tried last, after every listed node failed, and
   * alone while no list is known.
   */
  url: Lazy<string | readonly string[]>;
  /**
   * The token; a function is called before every attempt, and ahead of the
   * token's expiry to refresh the open session in band.
   */
  token: Lazy<string>;
  /**
   * Certificate pins (see `fetchCertificateHashes`); a function is called before
   * every attempt at a configured URL. Once it has given a pin, a node of the
   * cluster's list is pinned to its own `cert_hash` (the list comes from a node
   * the pins were checked against); without pins, listed nodes are not pinned.
   */
  certificateHashes?: Lazy<ReadonlyArray<Uint8Array | string>>;
  backoff?: BackoffOptions;
  /** Random numbers in [0, 1) for the jitter and the choice of a node (default Math.random). */
  random?: () => number;
  /** Timers (default the global ones). */
  clock?: Clock;
  /** How long to wait for Welcome, in ms (default 10000). */
  handshakeTimeoutMs?: number;
  /** Creates the WebTransport (tests pass a fake). */
  transport?: WebTransportFactory;
  /** Opens one session (default `TuttiClient.connect`); tests may replace it. */
  connect?: (options: ConnectOptions) => Promise<TuttiClient>;
  /** Start connecting at once (default true); otherwise call `start()`. */
  autoStart?: boolean;
}

type Listener<T> = (value: T) => void;

class Emitter<T> {
  private readonly listeners = new Set<Listener<T>>();
  on(listener: Listener<T>): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }
  emit(value: T): void {
    for (const l of [...this.listeners]) {
      try {
        l(value);
      } catch (err) {
        console.error("Tutti listener failed", err);
      }
    }
  }
}

/** At most `perSecond` events per second, spaced evenly (the server's rate limits). */
class Pacer {
  private last = -Infinity;
  constructor(private readonly perSecond: number) {}
  allow(now: number): boolean {
    if (now - this.last < 1000 / this.perSecond) return false;
    this.last = now;
    return true;
  }
}

/**
 * A session must stay up this long before the backoff starts again from its first
 * step; a server that accepts and drops clients at once meets growing delays.
 */
export const STABLE_SESSION_MS = 10_000;

/** The server relays at most this many typing datagrams per second per session. */
export const TYPING_PER_SECOND = 5;
/** Cursor datagrams sent per second at most. */
export const CURSORS_PER_SECOND = 20;

/**
 * A connection to a Tutti server that reconnects by itself. Requests made while
 * reconnecting wait for the next session; requests in flight when a session is lost
 * reject with a TuttiError `CONNECTION_LOST` (`reconnect: true`), since the server
 * may or may not have carried them out.
 */
export class Tutti {
  private readonly options: TuttiOptions;
  private readonly clock: Clock;
  private readonly random: () => number;
  private client?: TuttiClient;
  private currentState: ConnectionState = "disconnected";
  private stopped = false;
  private started = false;
  private attempt = 0;
  private urlIndex = 0;
  private reconnectTimer?: unknown;
  private wakeTimer?: () => void;
  private reconnectCount = 0;
  private everConnected = false;
  private lastError?: TuttiError;
  private waiters: Array<{ resolve: (c: TuttiClient) => void; reject: (e: TuttiError) => void }> = [];
  /** The last offset delivered to the application, per stream ("room/<id>", "notifications"). */
  private readonly offsets = new Map<string, bigint>();
  private readonly typingPacer = new Pacer(TYPING_PER_SECOND);
  private readonly cursorPacer = new Pacer(CURSORS_PER_SECOND);
  private readonly reopenHooks = new Set<(client: TuttiClient) => Promise<void>>();
  private metricsSubscription?: { eventTypes: string[]; metrics: string[]; intervalMs: number; allNodes: boolean };
  /** The cluster's nodes, from the last Welcome (or a Close that listed some). */
  private knownNodes: ClusterNode[] = [];
  /** The node of the session that ended last: tried after the others. */
  private leftNode?: string;
  /** Whether the configured certificate hashes ever gave a pin (undefined: not asked yet). */
  private pinned?: boolean;

  private readonly stateEvents = new Emitter<StateChange>();
  private readonly pushEvents = new Emitter<Push>();
  private readonly datagramEvents = new Emitter<Datagram>();

  constructor(options: TuttiOptions) {
    this.options = options;
    this.clock = options.clock ?? realClock;
    this.random = options.random ?? Math.random;
    // Subscriptions are per session: make them again on the new one.
    this.onReconnected(async (client) => {
      const sub = this.metricsSubscription;
      if (sub) await client.call({ case: "metricsSubscribe", value: sub });
    });
    if (options.autoStart !== false) this.start();
  }

  /** The current state. */
  get state(): ConnectionState {
    return this.currentState;
  }

  /** The current session, if connected. */
  get session(): TuttiClient | undefined {
    return this.currentState === "connected" ? this.client : undefined;
  }

  /** The user id of the current (or last) session. */
  get userId(): string | undefined {
    return this.client?.welcome?.userId;
  }

  /** The id of the node serving the current (or last) session (`Welcome.node_id`). */
  get nodeId(): string | undefined {
    return this.client?.welcome?.nodeId || undefined;
  }

  /**
   * The server's clock now, in ms since the epoch: this device's clock corrected
   * by the current (or last) session's `Welcome.server_time_ms`.
   */
  serverNow(): number {
    return this.client ? this.client.serverNow() : Date.now();
  }

  /**
   * The nodes of the cluster as last heard: `Welcome.nodes` of the latest session,
   * replaced by the `nodes` of a `Close` (GOING_AWAY, REDIRECT) that lists some.
   * Each has `nodeId`, `webtransportUrl`, `certHash` (lowercase hex SHA-256 of its
   * certificate), `sessions` and `draining`. Empty on a single node (or before the
   * first session): reconnects then use the configured URLs.
   */
  get nodes(): readonly ClusterNode[] {
    return [...this.knownNodes];
  }

  /** Why the last session ended, if one did. */
  get error(): TuttiError | undefined {
    return this.lastError;
  }

  /** How many times the connection was re-established after a loss. */
  get reconnects(): number {
    return this.reconnectCount;
  }

  /** The offsets that the next Hello will resume from. */
  resumeOffsets(): Record<string, bigint> {
    return Object.fromEntries(this.offsets);
  }

  /**
   * Records that the application has everything of `stream` up to `offset` (from a
   * history page or the room list, say): pushes at or below it are not delivered
   * again, and a reconnect resumes after it. Offsets only move forward.
   */
  markSeen(stream: string, offset: bigint): void {
    const known = this.offsets.get(stream);
    if (known === undefined || offset > known) this.offsets.set(stream, offset);
  }

  /**
   * Starts tracking `stream` at `offset` if it is not tracked yet (a room first seen
   * in the room list, say), so that a reconnect resumes it. A tracked stream keeps
   * its offset: the pushes after it are still to be delivered.
   */
  trackStream(stream: string, offset: bigint): void {
    if (!this.offsets.has(stream)) this.offsets.set(stream, offset);
  }

  /** Starts connecting (when created with `autoStart: false`). */
  start(): void {
    if (this.started) return;
    this.started = true;
    void this.run();
  }

  /** Closes the connection for good; pending and future requests reject with CLOSED. */
  close(): void {
    if (this.stopped) return;
    this.stopped = true;
    if (this.reconnectTimer !== undefined) this.clock.clearTimeout(this.reconnectTimer);
    this.wakeTimer?.();
    this.client?.close();
    const err = TuttiError.local("CLOSED", "the connection was closed");
    this.lastError = err;
    this.failWaiters(err);
    this.setState({ state: "disconnected", error: err });
  }

  /** Calls `listener` on every state change; returns a function that removes it. */
  onState(listener: Listener<StateChange>): () => void {
    return this.stateEvents.on(listener);
  }

  /**
   * Every push, once: pushes with an offset at or below one already delivered for
   * their stream (a replay after resume) are dropped.
   */
  onPush(listener: Listener<Push>): () => void {
    return this.pushEvents.on(listener);
  }

  /** Every datagram from the server (typing, cursors). */
  onDatagram(listener: Listener<Datagram>): () => void {
    return this.datagramEvents.on(listener);
  }

  /** Resolves with the session once connected; rejects when the connection stops for good. */
  connected(): Promise<TuttiClient> {
    if (this.currentState === "connected" && this.client) return Promise.resolve(this.client);
    if (this.stopped) return Promise.reject(this.lastError ?? TuttiError.local("CLOSED", "the connection was closed"));
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  /**
   * Runs `hook` after every reconnect, before waiting requests go out (documents
   * re-open themselves with it). Returns a function that removes it.
   */
  onReconnected(hook: (client: TuttiClient) => Promise<void>): () => void {
    this.reopenHooks.add(hook);
    return () => this.reopenHooks.delete(hook);
  }

  /** Sends a request (waiting for a session if needed); resolves with its answer body. */
  async call<C extends RequestCase>(body: Extract<RequestBody, { case: C }>): Promise<Answer<C>> {
    const client = await this.connected();
    return client.call(body);
  }

  // ------------------------------------------------------------------ chat

  /**
   * Rooms of the user with their last message, unread count and read mark. The
   * server answers in pages that fit in a frame; this reads them all.
   */
  async rooms(): Promise<RoomSummary[]> {
    const rooms: RoomSummary[] = [];
    let cursor = "";
    for (;;) {
      const answer = await this.call({ case: "roomList", value: { cursor } });
      rooms.push(...answer.rooms);
      if (!answer.more || !answer.nextCursor) return rooms;
      cursor = answer.nextCursor;
    }
  }

  /**
   * Creates a room; the caller is its admin, the others are invited. Leave `roomId`
   * empty to have the server pick one; a chosen one becomes `"<user>~<roomId>"`.
   */
  async createRoom(name: string, participants: string[] = [], roomId = ""): Promise<Room> {
    const answer = await this.call({ case: "roomCreate", value: { roomId, name, participants } });
    return answer.room!;
  }

  /**
   * The user's pending room invitations, oldest first. Someone named when a room is
   * created, or added to it, is invited (unless the server's join policy adds them
   * directly) and is in the room only once they accept. List again after a
   * reconnect; new ones arrive through `onInvite`.
   */
  async invites(): Promise<RoomInvite[]> {
    const answer = await this.call({ case: "roomInviteList", value: {} });
    return answer.invites;
  }

  /** Accepts an invitation: the user becomes a participant. Returns the room. */
  async acceptInvite(roomId: string): Promise<Room> {
    const answer = await this.call({ case: "roomInviteAccept", value: { roomId } });
    return answer.room!;
  }

  /** Declines an invitation. */
  async declineInvite(roomId: string): Promise<void> {
    await this.call({ case: "roomInviteDecline", value: { roomId } });
  }

  /** Someone invited the user into a room. */
  onInvite(listener: Listener<RoomInvite>): () => void {
    return this.onPush((p) => p.event.case === "roomInvite" && listener(p.event.value));
  }

  /**
   * Invites someone into a room, or adds them directly when the server's join
   * policy allows it (admins only). The room lists them in `invitees` until they
   * accept.
   */
  async addToRoom(roomId: string, userId: string, admin = false): Promise<Room> {
    const answer = await this.call({ case: "roomAdd", value: { roomId, userId, admin } });
    return answer.room!;
  }

  /** Removes someone from a room (admins only). */
  async removeFromRoom(roomId: string, userId: string): Promise<void> {
    await this.call({ case: "roomRemove", value: { roomId, userId } });
  }

  /** Leaves a room. */
  async leaveRoom(roomId: string): Promise<void> {
    await this.call({ case: "roomLeave", value: { roomId } });
  }

  /**
   * Sends a message; resolves with it once the server committed it. The message
   * carries a client message id (a new one unless a non-empty
   * `options.clientMessageId` is given), and a send that fails in a way that
   * may pass (storage unavailable, the session lost before the answer) is
   * retried with the same id after a backoff, up to `options.attempts` tries
   * in all (default 5): the server stores a message once per id, so a retry of
   * a send that did commit returns the stored message instead of a second copy.
   */
  async sendMessage(
    roomId: string,
    text: string,
    options: { clientMessageId?: string; attempts?: number } = {},
  ): Promise<ChatMessage> {
    // An empty id would store nothing to find a retry by: it gets a new one too.
    const clientMessageId = options.clientMessageId || newClientMessageId(this.serverNow());
    const attempts = Math.max(1, options.attempts ?? 5);
    for (let attempt = 1; ; attempt++) {
      try {
        const answer = await this.call({ case: "chatSend", value: { roomId, text, clientMessageId } });
        return answer.message!;
      } catch (err) {
        if (attempt >= attempts || this.stopped || !isRetryableSend(err)) throw err;
        const delayMs = backoffDelay(attempt, this.options.backoff, this.random);
        await new Promise<void>((resolve) => this.clock.setTimeout(resolve, delayMs));
      }
    }
  }

  /**
   * One page of history, oldest first: the messages before `beforeOffset` (0: the
   * newest ones). The newest page starts tracking the room (see `trackStream`).
   */
  async history(roomId: string, beforeOffset = 0n, limit = 50): Promise<{ messages: ChatMessage[]; more: boolean }> {
    const answer = await this.call({ case: "chatHistory", value: { roomId, beforeOffset, limit } });
    const newest = answer.messages[answer.messages.length - 1];
    if (newest && beforeOffset === 0n) this.trackStream(`room/${roomId}`, newest.offset);
    return { messages: answer.messages, more: answer.more };
  }

  /** Moves the read mark forward; resolves with the mark and the unread count. */
  async markRead(roomId: string, offset: bigint): Promise<{ readOffset: bigint; unread: bigint }> {
    const answer = await this.call({ case: "chatMarkRead", value: { roomId, offset } });
    return { readOffset: answer.readOffset, unread: answer.unread };
  }

  /**
   * Tells the room's other sessions that the user is (or stopped) typing, as a
   * datagram. Calls beyond the server's rate (5 per second) are dropped here;
   * returns whether it was sent.
   */
  setTyping(roomId: string, typing: boolean, now = Date.now()): boolean {
    const client = this.session;
    if (!client || (typing && !this.typingPacer.allow(now))) return false;
    client.sendDatagram({ kind: { case: "typing", value: { roomId, typing } } }).catch(() => {});
    return true;
  }

  /** Chat messages (live and missed ones after a reconnect), each once. */
  onMessage(listener: Listener<ChatMessage>): () => void {
    return this.onPush((p) => p.event.case === "chatMessage" && listener(p.event.value));
  }

  /** Someone's read mark moved. */
  onReadReceipt(listener: Listener<ChatReadReceipt>): () => void {
    return this.onPush((p) => p.event.case === "chatReadReceipt" && listener(p.event.value));
  }

  /** A room was created, or someone was added, removed or left. */
  onRoomEvent(listener: Listener<RoomEvent>): () => void {
    return this.onPush((p) => p.event.case === "roomEvent" && listener(p.event.value));
  }

  /** Someone else started or stopped typing. */
  onTyping(listener: Listener<ChatTyping>): () => void {
    return this.onDatagram((d) => d.kind.case === "typing" && listener(d.kind.value));
  }

  // --------------------------------------------------------- notifications

  /**
   * One page of notifications, oldest first, with the exact unread count. The newest
   * page starts tracking the notifications stream (see `trackStream`).
   */
  async notifications(beforeOffset = 0n, limit = 50): Promise<{ notifications: Notification[]; more: boolean; unread: bigint }> {
    const answer = await this.call({ case: "notifyList", value: { beforeOffset, limit } });
    const newest = answer.notifications[answer.notifications.length - 1];
    if (newest && beforeOffset === 0n) this.trackStream("notifications", newest.offset);
    return { notifications: answer.notifications, more: answer.more, unread: answer.unread };
  }

  /** Marks notifications read; resolves with how many changed and the unread count. */
  async markNotificationsRead(ids: string[]): Promise<{ marked: number; unread: bigint }> {
    const answer = await this.call({ case: "notifyMarkRead", value: { notificationIds: ids } });
    return { marked: answer.marked, unread: answer.unread };
  }

  /** Marks every notification read. */
  async markAllNotificationsRead(): Promise<{ marked: number; unread: bigint }> {
    const answer = await this.call({ case: "notifyMarkAllRead", value: {} });
    return { marked: answer.marked, unread: answer.unread };
  }

  /** New notifications (live and missed ones), each once. */
  onNotification(listener: Listener<Notification>): () => void {
    return this.onPush((p) => p.event.case === "notification" && listener(p.event.value));
  }

  /** Notifications were marked read (on any of the user's sessions), with the unread count. */
  onNotificationsRead(listener: Listener<NotificationsRead>): () => void {
    return this.onPush((p) => p.event.case === "notificationsRead" && listener(p.event.value));
  }

  // --------------------------------------------------------------- presence

  /** Sets the user's status (online, away, do not disturb) on all their sessions. */
  async setStatus(status: PresenceStatus): Promise<PresenceState> {
    const answer = await this.call({ case: "presenceSet", value: { status } });
    return answer.state!;
  }

  /** The presence of contacts or room co-participants (at most 100). */
  async presence(userIds: string[]): Promise<PresenceState[]> {
    const answer = await this.call({ case: "presenceGet", value: { userIds } });
    return answer.states;
  }

  /** Asks `userId` to be a contact; ACCEPTED if they had asked first. */
  async requestContact(userId: string): Promise<ContactState> {
    const answer = await this.call({ case: "contactRequest", value: { userId } });
    return answer.state;
  }

  /** Accepts an incoming contact request. */
  async acceptContact(userId: string): Promise<void> {
    await this.call({ case: "contactAccept", value: { userId } });
  }

  /** Removes a contact or a request. */
  async removeContact(userId: string): Promise<void> {
    await this.call({ case: "contactRemove", value: { userId } });
  }

  /** Contacts and requests, with presence for accepted ones. */
  async contacts(): Promise<Contact[]> {
    const answer = await this.call({ case: "contactList", value: {} });
    return answer.contacts;
  }

  /** Presence changes of contacts, co-participants and the user's other sessions. */
  onPresence(listener: Listener<PresenceState>): () => void {
    return this.onPush((p) => p.event.case === "presence" && listener(p.event.value));
  }

  /** Contact requests, acceptances and removals by others. */
  onContactEvent(listener: Listener<ContactEvent>): () => void {
    return this.onPush((p) => p.event.case === "contactEvent" && listener(p.event.value));
  }

  // ---------------------------------------------------------- documents

  /**
   * Creates a document owned by the user and returns its id: a chosen `docId`
   * becomes `"<user>~<docId>"` (ids are namespaced per creator); an empty one has
   * the server pick it.
   */
  async createDocument(docId: string, text = ""): Promise<string> {
    const answer = await this.call({ case: "docCreate", value: { docId, text } });
    return answer.docId;
  }

  /**
   * Opens a shared document: a local copy kept in step with everyone's edits, with
   * undo of one's own edits, remote cursors, and re-opening after reconnects.
   */
  openDocument(docId: string): Promise<TuttiDocument> {
    return TuttiDocument.open(this, docId);
  }

  /** Shares a document (owner only); `DocRole.UNSPECIFIED` revokes. */
  async shareDocument(docId: string, userId: string, role: DocRole): Promise<void> {
    await this.call({ case: "docShare", value: { docId, userId, role } });
  }

  /**
   * The documents the user owns or that are shared with them, ordered by id, with
   * their role and current revision. The server lists at most its configured number
   * (1,000 by default), the first ones by id; `more` is true when there are others.
   */
  async docList(): Promise<{ docs: DocSummary[]; more: boolean }> {
    const answer = await this.call({ case: "docList", value: {} });
    return { docs: answer.docs, more: answer.more };
  }

  /**
   * The user's access to a document changed: shared with them, their role changed,
   * or revoked (`role` is `DocRole.UNSPECIFIED`). Not replayed after a reconnect:
   * call `docList()` again then.
   */
  onDocShared(listener: Listener<DocShared>): () => void {
    return this.onPush((p) => p.event.case === "docShared" && listener(p.event.value));
  }

  /**
   * Sends a cursor as a datagram, at most 20 per second (later calls within the
   * interval are dropped; returns whether it was sent).
   */
  sendCursor(docId: string, revision: bigint, anchor: number, head: number, now = Date.now()): boolean {
    const client = this.session;
    if (!client || !this.cursorPacer.allow(now)) return false;
    client
      .sendDatagram({ kind: { case: "cursor", value: { docId, revision, anchor: BigInt(anchor), head: BigInt(head) } } })
      .catch(() => {});
    return true;
  }

  // ---------------------------------------------------------- analytics

  /** Records analytics events for the user; resolves with the occurrences counted. */
  async track(events: ReadonlyArray<{ type: string; count?: number; dimensions?: Record<string, string> }>): Promise<bigint> {
    const answer = await this.call({
      case: "analyticsTrack",
      value: { events: events.map((e) => ({ type: e.type, count: e.count ?? 0, dimensions: e.dimensions ?? {} })) },
    });
    return answer.accepted;
  }

  /**
   * A time series of one event type (role `metrics`). In a cluster the points are
   * summed over the nodes that answered (`nodes` has each node's total, and with
   * `byNode` its points too; `missingNodes` the nodes that did not answer).
   */
  analyticsSeries(
    type: string,
    durationMs: bigint,
    resolutionMs: bigint,
    dimension = "",
    byNode = false,
  ): Promise<AnalyticsSeriesResponse> {
    return this.call({ case: "analyticsSeries", value: { type, dimension, durationMs, resolutionMs, byNode } });
  }

  /** The busiest event types of the last `windowMs` (role `metrics`). */
  async analyticsTop(windowMs: bigint, limit = 10): Promise<AnalyticsTopResponse["types"]> {
    return (await this.call({ case: "analyticsTop", value: { windowMs, limit } })).types;
  }

  /** Estimated distinct users of the last `windowMs` (role `metrics`). */
  async distinctUsers(windowMs: bigint): Promise<bigint> {
    return (await this.call({ case: "analyticsDistinctUsers", value: { windowMs } })).estimate;
  }

  /**
   * Streams metrics updates (role `metrics`); listen with `onMetrics`. The
   * subscription is made again after every reconnect, until `unsubscribeMetrics`.
   */
  async subscribeMetrics(subscription: MetricsSubscription = {}): Promise<MetricsSubscribeResponse> {
    const value = {
      eventTypes: subscription.eventTypes ?? ["*"],
      metrics: subscription.metrics ?? ["*"],
      intervalMs: subscription.intervalMs ?? 0,
      allNodes: subscription.allNodes ?? false,
    };
    const answer = await this.call({ case: "metricsSubscribe", value });
    this.metricsSubscription = value;
    return answer;
  }

  /** Ends the metrics subscription. */
  async unsubscribeMetrics(): Promise<void> {
    this.metricsSubscription = undefined;
    await this.call({ case: "metricsUnsubscribe", value: {} });
  }

  /** Metrics updates of the subscription. */
  onMetrics(listener: Listener<MetricsUpdate>): () => void {
    return this.onPush((p) => p.event.case === "metricsUpdate" && listener(p.event.value));
  }

  /** Diagnostics: the server echoes `payload` (and pushes it too with `push`). */
  async echo(payload: string, push = false): Promise<string> {
    const answer = await this.call({ case: "echo", value: { payload: new TextEncoder().encode(payload), push } });
    return new TextDecoder().decode(answer.payload);
  }

  // ---------------------------------------------------------- internals

  private setState(change: StateChange): void {
    this.currentState = change.state;
    this.stateEvents.emit(change);
  }

  private failWaiters(err: TuttiError): void {
    for (const w of this.waiters.splice(0)) w.reject(err);
  }

  private async urls(): Promise<string[]> {
    const u = await resolveLazy(this.options.url);
    return typeof u === "string" ? [u] : [...u];
  }

  /** The configured certificate pins (and whether any were ever given). */
  private async configuredPins(): Promise<ReadonlyArray<Uint8Array | string> | undefined> {
    if (this.options.certificateHashes === undefined) {
      this.pinned ??= false;
      return undefined;
    }
    const pins = await resolveLazy(this.options.certificateHashes);
    this.pinned = this.pinned === true || pins.length > 0;
    return pins;
  }

  /**
   * One session attempt: at a node of the cluster's list (its URL, and its own pin
   * when pins are in use), or at the current configured URL (`node` undefined).
   */
  private async connectTo(node: ClusterNode | undefined): Promise<TuttiClient> {
    const options: ConnectOptions = {
      url: "",
      token: await resolveLazy(this.options.token),
      resume: this.resumeOffsets(),
    };
    const token = this.options.token;
    if (typeof token === "function") options.getToken = () => resolveLazy(token);
    if (this.options.handshakeTimeoutMs !== undefined) options.handshakeTimeoutMs = this.options.handshakeTimeoutMs;
    if (this.options.transport) options.transport = this.options.transport;
    let target: ConnectOptions | undefined = options;
    if (node) {
      if (this.pinned === undefined) await this.configuredPins();
      // When pinning, the node's own pin takes the place of the configured ones.
      target = optionsForNode(this.pinned ? { ...options, certificateHashes: [node.certHash] } : options, node);
      if (!target) {
        throw TuttiError.local("CONNECT_FAILED", `node ${node.nodeId} lists no usable URL or certificate pin`, true);
      }
    } else {
      const urls = await this.urls();
      options.url = urls[this.urlIndex % urls.length]!;
      const pins = await this.configuredPins();
      if (pins !== undefined) options.certificateHashes = pins;
    }
    const connect = this.options.connect ?? ((o: ConnectOptions) => TuttiClient.connect(o));
    return connect(target);
  }

  /**
   * One round of attempts: the nodes of the cluster's list in `failoverOrder` (the
   * node just left last), then the current configured URL, one after another
   * without a pause. Resolves with the first session, or with the error that ended
   * the round: the last failure, a refusal for good, or a REDIRECT that reached
   * here (the redirect was followed once already: the cluster is loaded, so the
   * round ends and the backoff runs).
   */
  private async connectRound(): Promise<TuttiClient | TuttiError> {
    const avoid = new Set(this.leftNode ? [this.leftNode] : []);
    const targets: Array<ClusterNode | undefined> = [...failoverOrder(this.knownNodes, this.random, avoid), undefined];
    let error = TuttiError.local("CONNECT_FAILED", "no node to connect to", true);
    for (const node of targets) {
      try {
        return await this.connectTo(node);
      } catch (err) {
        error = err instanceof TuttiError ? err : TuttiError.local("CONNECT_FAILED", String(err), true);
        if (node === undefined) this.urlIndex++;
        if (error.nodes.length > 0) this.knownNodes = [...error.nodes];
        if (this.stopped || !shouldRetry(error)) return error;
        if (error.source === "server" && error.code === REDIRECT) return error;
      }
    }
    return error;
  }

  private async run(): Promise<void> {
    this.setState({ state: "connecting" });
    while (!this.stopped) {
      const result = await this.connectRound();
      if (this.stopped) {
        if (result instanceof TuttiClient) result.close();
        return;
      }
      if (result instanceof TuttiError) {
        if (!(await this.retryAfter(result))) return;
        continue;
      }
      const client = result;
      this.client = client;
      this.knownNodes = [...client.welcome.nodes];
      const stops = [
        client.onPush((push) => this.deliver(push)),
        client.onDatagram((d) => this.datagramEvents.emit(d)),
        client.onDraining(() => client.close("the server is draining")),
      ];
      const isReconnect = this.everConnected;
      this.everConnected = true;
      if (isReconnect) {
        this.reconnectCount++;
        try {
          for (const hook of [...this.reopenHooks]) await hook(client);
        } catch {
          // The new session failed already: its close is handled below.
        }
      }
      const stable = this.clock.setTimeout(() => {
        this.attempt = 0;
      }, STABLE_SESSION_MS);
      if (client.isOpen) {
        this.setState({ state: "connected", nodeId: client.welcome.nodeId, reconnects: this.reconnectCount });
        for (const w of this.waiters.splice(0)) w.resolve(client);
      }
      const reason = await client.closed;
      this.clock.clearTimeout(stable);
      for (const stop of stops) stop();
      if (this.stopped) return;
      this.leftNode = client.welcome.nodeId || undefined;
      // A draining node of a cluster lists where to go (itself excluded).
      if (reason.nodes.length > 0) this.knownNodes = [...reason.nodes];
      const goingAway = reason.source === "server" && reason.code === GOING_AWAY;
      // Going away / draining: move on to the next configured URL first.
      if (goingAway || reason.message === "the server is draining") this.urlIndex++;
      const err =
        reason.source === "client" && reason.name === "NORMAL"
          ? TuttiError.local("CONNECTION_LOST", reason.message, true)
          : reason;
      // A draining node says when to come back (spread over its sessions).
      const delayMs = goingAway && reason.retryAfterMs > 0 ? reason.retryAfterMs : undefined;
      if (!(await this.retryAfter(err, delayMs))) return;
    }
  }

  /**
   * Waits out the backoff (or `delayMs`, when the server said how long) before the
   * next round; false when not to reconnect.
   */
  private async retryAfter(err: TuttiError, delayMs?: number): Promise<boolean> {
    this.lastError = err;
    if (!shouldRetry(err) || this.stopped) {
      this.stopped = true;
      this.failWaiters(err);
      this.setState({ state: "disconnected", error: err });
      return false;
    }
    this.attempt++;
    const delay = delayMs ?? backoffDelay(this.attempt, this.options.backoff, this.random);
    this.setState({ state: "reconnecting", error: err, attempt: this.attempt, delayMs: delay });
    await new Promise<void>((resolve) => {
      this.wakeTimer = resolve;
      this.reconnectTimer = this.clock.setTimeout(resolve, delay);
    });
    this.reconnectTimer = undefined;
    this.wakeTimer = undefined;
    return !this.stopped;
  }

  /** Delivers a push once: offsets at or below the last delivered one are replays. */
  private deliver(push: Push): void {
    if (push.stream && push.offset > 0n && !push.stream.startsWith("doc/")) {
      const known = this.offsets.get(push.stream);
      if (known !== undefined && push.offset <= known) return;
      this.offsets.set(push.stream, push.offset);
    }
    this.pushEvents.emit(push);
  }
}
