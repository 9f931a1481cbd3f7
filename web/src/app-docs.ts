// The documents part of the app: a list, create and share, and a collaborative
// editor on CodeMirror 6 with remote cursors and selections labelled by user, and
// who is here. The shared text and undo of one's own edits live in TuttiDocument
// (src/document.ts); this file maps CodeMirror's UTF-16 changes to code points.

import { EditorState, StateEffect, StateField, Annotation, Prec } from "@codemirror/state";
import type { Text } from "@codemirror/state";
import { Decoration, EditorView, WidgetType, keymap } from "@codemirror/view";
import type { DecorationSet } from "@codemirror/view";
import { defaultKeymap } from "@codemirror/commands";
import { TextSelection, codePointToUtf16Offset, utf16ToCodePointOffset } from "./ot";
import { changesToOp, opToChanges } from "./cm-ot";
import { DocRole } from "./tutti";
import type { DocSummary, Tutti, TuttiDocument } from "./tutti";

const remoteChange = Annotation.define<boolean>();

interface RemoteCursor {
  userId: string;
  sessionId: string;
  from: number;
  to: number;
  head: number;
}

const setCursors = StateEffect.define<RemoteCursor[]>();

/** A stable colour per user. */
function colour(user: string): string {
  let hash = 0;
  for (const ch of user) hash = (hash * 31 + ch.codePointAt(0)!) >>> 0;
  return `hsl(${hash % 360} 70% 45%)`;
}

class CaretWidget extends WidgetType {
  constructor(
    readonly user: string,
    readonly session: string,
  ) {
    super();
  }
  override eq(other: CaretWidget): boolean {
    return other.user === this.user && other.session === this.session;
  }
  toDOM(): HTMLElement {
    const caret = document.createElement("span");
    caret.className = "remote-caret";
    caret.dataset["user"] = this.user;
    caret.style.cssText = `border-left: 2px solid ${colour(this.user)}; margin-left: -1px; position: relative;`;
    const label = document.createElement("span");
    label.className = "remote-label";
    label.textContent = this.user;
    label.style.cssText = `position: absolute; top: -1.2em; left: -1px; font-size: 0.7rem; padding: 0 3px; color: #fff; background: ${colour(this.user)}; white-space: nowrap; border-radius: 3px 3px 3px 0;`;
    caret.append(label);
    return caret;
  }
}

const cursorField = StateField.define<DecorationSet>({
  create: () => Decoration.none,
  update(deco, tr) {
    deco = deco.map(tr.changes);
    for (const e of tr.effects) {
      if (!e.is(setCursors)) continue;
      const len = tr.state.doc.length;
      const ranges = [];
      for (const c of e.value) {
        const head = Math.min(c.head, len);
        ranges.push(Decoration.widget({ widget: new CaretWidget(c.userId, c.sessionId), side: 1 }).range(head));
        const from = Math.min(c.from, len);
        const to = Math.min(c.to, len);
        if (from < to) {
          ranges.push(
            Decoration.mark({
              class: "remote-selection",
              attributes: { style: `background: color-mix(in srgb, ${colour(c.userId)} 25%, transparent)`, "data-user": c.userId },
            }).range(from, to),
          );
        }
      }
      deco = Decoration.set(ranges, true);
    }
    return deco;
  },
  provide: (f) => EditorView.decorations.from(f),
});

/** Where earlier versions of the app kept the documents opened in this browser. */
const OLD_KNOWN_DOCS_KEY = "tutti.docs";

/** A document in the list: the server's summary, by id. */
interface ListedDoc {
  docId: string;
  ownerId: string;
  role: DocRole;
}

function roleName(role: DocRole): string {
  return DocRole[role]?.toLowerCase() ?? "?";
}

/** Documents: the list in the side bar and the editor view. */
export class DocsView {
  private doc?: TuttiDocument;
  private view?: EditorView;
  private readonly stops: Array<() => void> = [];
  /** The user's documents as the server lists them, kept current by DocShared pushes. */
  private readonly listed = new Map<string, ListedDoc>();
  /** The server listed only its first documents by id. */
  private more = false;
  /** DocShared pushes received so far (a list answer older than one is asked again). */
  private pushes = 0;

  constructor(
    private readonly tutti: Tutti,
    private readonly me: string,
    private readonly onOpenChange: (open: boolean) => void,
    private readonly onError: (err: unknown) => void,
  ) {
    try {
      localStorage.removeItem(OLD_KNOWN_DOCS_KEY);
    } catch {
      // Storage is optional.
    }
    // The list comes from the server after every (re)connect (pushes are not
    // replayed), then follows the DocShared pushes.
    tutti.onState((s) => {
      if (s.state === "connected") void this.loadList();
    });
    tutti.onDocShared((shared) => {
      this.pushes++;
      if (shared.role === DocRole.UNSPECIFIED) {
        this.listed.delete(shared.docId);
        if (this.doc?.docId === shared.docId) this.status(`${shared.ownerId} no longer shares this document with you`);
      } else this.listed.set(shared.docId, { docId: shared.docId, ownerId: shared.ownerId, role: shared.role });
      this.renderList();
    });
    const form = document.getElementById("open-doc-form") as HTMLFormElement;
    const input = document.getElementById("doc-id") as HTMLInputElement;
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      void this.open(input.value.trim());
    });
    document.getElementById("doc-create")!.addEventListener("click", () => {
      const id = input.value.trim();
      if (!id) return input.reportValidity();
      // The server namespaces a chosen id: "<user>~<id>".
      this.tutti
        .createDocument(id, "")
        .then((docId) => Promise.all([this.open(docId), this.loadList()]))
        .catch(this.onError);
    });
    document.getElementById("doc-share-form")!.addEventListener("submit", (e) => {
      e.preventDefault();
      const user = (document.getElementById("doc-share-user") as HTMLInputElement).value.trim();
      const role = (document.getElementById("doc-share-role") as HTMLSelectElement).value === "viewer" ? DocRole.VIEWER : DocRole.EDITOR;
      if (!this.doc || !user) return;
      this.tutti
        .shareDocument(this.doc.docId, user, role)
        .then(() => {
          this.status(`Shared with ${user} (${role === DocRole.VIEWER ? "viewer" : "editor"})`);
          return this.loadList();
        })
        .catch(this.onError);
    });
  }

  /** Asks the server for the user's documents and shows them. */
  async loadList(): Promise<void> {
    let answer: { docs: DocSummary[]; more: boolean };
    const pushes = this.pushes;
    try {
      answer = await this.tutti.docList();
    } catch (err) {
      this.onError(err);
      return;
    }
    // A push that arrived meanwhile may be newer than the answer: ask again.
    if (this.pushes !== pushes) return this.loadList();
    this.listed.clear();
    for (const d of answer.docs) this.listed.set(d.docId, { docId: d.docId, ownerId: d.ownerId, role: d.role });
    this.more = answer.more;
    this.renderList();
  }

  /** Shows the user's documents (owned and shared with them), by id. */
  renderList(): void {
    const list = document.getElementById("doc-list")!;
    const docs = [...this.listed.values()].sort((a, b) => (a.docId < b.docId ? -1 : a.docId > b.docId ? 1 : 0));
    const items = docs.map((d) => {
      const item = document.createElement("li");
      item.dataset["doc"] = d.docId;
      item.dataset["role"] = roleName(d.role);
      const button = document.createElement("button");
      button.type = "button";
      button.className = "item";
      const name = document.createElement("span");
      name.className = "room-name";
      name.textContent = d.docId;
      const role = document.createElement("span");
      role.className = "muted small doc-role";
      role.textContent = roleName(d.role);
      button.append(name, role);
      if (d.ownerId !== this.me) {
        const owner = document.createElement("span");
        owner.className = "room-last";
        owner.textContent = `shared by ${d.ownerId}`;
        button.append(owner);
      }
      button.setAttribute("aria-label", `${d.docId}, ${roleName(d.role)}${d.ownerId !== this.me ? `, shared by ${d.ownerId}` : ""}`);
      button.addEventListener("click", () => void this.open(d.docId));
      item.append(button);
      if (this.doc?.docId === d.docId) item.setAttribute("aria-current", "true");
      return item;
    });
    if (this.more) {
      const item = document.createElement("li");
      item.className = "muted small";
      item.textContent = "More documents: open one by its id.";
      items.push(item);
    }
    list.replaceChildren(...items);
  }

  private status(message: unknown): void {
    const text = message instanceof Error ? message.toString() : String(message);
    document.getElementById("doc-status")!.textContent = text;
  }

  /** Opens a document in the editor. */
  async open(docId: string): Promise<void> {
    if (!docId) return;
    this.close();
    let doc: TuttiDocument;
    try {
      doc = await this.tutti.openDocument(docId);
    } catch (err) {
      this.onError(err);
      return;
    }
    this.doc = doc;
    this.renderList();
    this.onOpenChange(true);
    document.getElementById("doc-title")!.textContent = docId;
    const viewer = doc.role === DocRole.VIEWER;
    document.getElementById("doc-role")!.textContent = `(${roleName(doc.role)})`;
    (document.getElementById("doc-share-form") as HTMLFormElement).hidden = doc.role !== DocRole.OWNER;
    this.status("");

    let fromEditor = false;
    const undoKeys = keymap.of([
      { key: "Mod-z", run: () => (doc.undo(), true), preventDefault: true },
      { key: "Mod-y", run: () => (doc.redo(), true), preventDefault: true },
      { key: "Mod-Shift-z", run: () => (doc.redo(), true), preventDefault: true },
    ]);
    const view = new EditorView({
      parent: document.getElementById("editor")!,
      state: EditorState.create({
        doc: doc.text,
        extensions: [
          Prec.highest(undoKeys),
          keymap.of(defaultKeymap),
          EditorView.lineWrapping,
          EditorState.readOnly.of(viewer),
          EditorView.editable.of(!viewer),
          EditorView.contentAttributes.of({ "aria-label": `Document ${docId}` }),
          cursorField,
          EditorView.updateListener.of((update) => {
            for (const tr of update.transactions) {
              if (!tr.docChanged || tr.annotation(remoteChange)) continue;
              const op = changesToOp(tr.changes, tr.startState.doc.toString());
              fromEditor = true;
              try {
                doc.edit(op);
              } catch (err) {
                this.status(err);
              } finally {
                fromEditor = false;
              }
            }
            if (update.selectionSet && !update.docChanged) doc.breakUndoGroup();
            if (update.selectionSet || update.docChanged) this.sendSelection(update.state.doc, update.state.selection.main);
          }),
        ],
      }),
    });
    this.view = view;
    this.stops.push(
      doc.onChange((change) => {
        if (fromEditor) return;
        const text = view.state.doc.toString();
        view.dispatch({ changes: opToChanges(change.op, text), annotations: remoteChange.of(true) });
        if (view.state.doc.toString() !== doc.text) {
          // Never expected: realign the editor with the document.
          view.dispatch({ changes: { from: 0, to: view.state.doc.length, insert: doc.text }, annotations: remoteChange.of(true) });
        }
        this.renderPeople();
      }),
      doc.onParticipants(() => this.renderPeople()),
      doc.onError((err) => this.status(err)),
      this.tutti.onState((s) => {
        if (s.state === "connected") this.sendSelection(view.state.doc, view.state.selection.main);
      }),
    );
    this.renderPeople();
    view.focus();
    (window as unknown as { tuttiDoc?: unknown }).tuttiDoc = { doc, view };
  }

  private sendSelection(text: Text, range: { anchor: number; head: number }): void {
    const doc = this.doc;
    if (!doc) return;
    const s = text.toString();
    doc.setSelection(new TextSelection(utf16ToCodePointOffset(s, range.anchor), utf16ToCodePointOffset(s, range.head)));
  }

  private renderPeople(): void {
    const doc = this.doc;
    const view = this.view;
    if (!doc || !view) return;
    const people = doc.participants();
    const list = document.getElementById("doc-people")!;
    const users = [...new Set(people.map((p) => p.userId))].sort();
    list.replaceChildren(
      ...users.map((u) => {
        const item = document.createElement("li");
        item.dataset["user"] = u;
        const dot = document.createElement("span");
        dot.className = "dot";
        dot.dataset["status"] = "online";
        dot.style.background = colour(u);
        dot.setAttribute("aria-hidden", "true");
        item.append(dot, u);
        return item;
      }),
    );
    const text = view.state.doc.toString();
    const cursors: RemoteCursor[] = [];
    for (const p of people) {
      if (!p.selection) continue;
      const { start, end } = p.selection.toUtf16(text);
      cursors.push({
        userId: p.userId,
        sessionId: p.sessionId,
        from: start,
        to: end,
        head: codePointToUtf16Offset(text, p.selection.head),
      });
    }
    view.dispatch({ effects: setCursors.of(cursors) });
  }

  /** Closes the open document, if any. */
  close(): void {
    if (!this.doc) return;
    for (const stop of this.stops.splice(0)) stop();
    this.view?.destroy();
    this.view = undefined;
    void this.doc?.close();
    this.doc = undefined;
    if (document.getElementById("doc-view")) document.getElementById("doc-people")!.replaceChildren();
    this.onOpenChange(false);
  }
}
