// TuttiDocument: a local copy of a shared document kept in step with the server by
// the three-state OT client (src/ot.ts). Operations arrive on the COLLAB push stream
// in revision order; the echo of this client's own operation (same client id and
// seq) acknowledges it, so acknowledgements and other people's operations are
// processed in the server's order, whatever order the control stream and the push
// stream deliver them in. After a reconnect the document re-opens itself from its
// revision and sends what was in flight again (same seq: the server drops a
// duplicate). Positions count Unicode scalar values, as everywhere in the protocol.

import { TuttiError } from "./client";
import type { TuttiClient } from "./client";
import { OtClient, TextOperation, TextSelection, fromTextOp, toTextOp } from "./ot";
import type { Outgoing } from "./ot";
import type { Tutti } from "./tutti";
import { DocRole } from "./gen/tutti/v1/collab_pb";
import type { DocCursor, DocOpenResponse, DocOperation, DocPresence } from "./gen/tutti/v1/collab_pb";
import type { Push } from "./gen/tutti/v1/frames_pb";

/** Someone else's session in the document, with their cursor mapped to the local text. */
export interface RemoteParticipant {
  userId: string;
  sessionId: string;
  /** Their selection in the local text (code points), if they sent one. */
  selection?: TextSelection;
}

/** What changed, for `onChange` listeners. */
export interface DocumentChange {
  /** The operation applied to the local text (code points). */
  op: TextOperation;
  /** Whether it came from someone else (or from a resync). */
  remote: boolean;
}

/** ErrorCode RESYNC_REQUIRED (src/codes.ts). */
const RESYNC_REQUIRED = 108;
/** Server operations kept to map remote cursors from older revisions. */
const OP_LOG = 200;
/** Undo steps kept. */
const UNDO_DEPTH = 200;
/** Own edits closer together than this (ms) form one undo step, unless a group break. */
const UNDO_GROUP_MS = 1000;

function randomId(): string {
  const bytes = new Uint8Array(9);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Transforms every step of an undo stack against `op` (ot.js UndoManager). */
function transformStack(stack: TextOperation[], op: TextOperation): TextOperation[] {
  const out: TextOperation[] = [];
  let o = op;
  for (let i = stack.length - 1; i >= 0; i--) {
    const [step, rest] = TextOperation.transform(stack[i]!, o);
    if (!step.isNoop()) out.push(step);
    o = rest;
  }
  return out.reverse();
}

/** An open shared document. Create it with `TuttiDocument.open(tutti, docId)`. */
export class TuttiDocument {
  readonly docId: string;
  /** Stable for this document object, across reconnects (the server dedups by it and seq). */
  readonly clientId: string;
  private textValue = "";
  private ot = new OtClient();
  private roleValue: DocRole = DocRole.UNSPECIFIED;
  private readonly early = new Map<bigint, DocOperation>();
  /** Server operations by revision (the last OP_LOG), to map old cursors forward. */
  private readonly log = new Map<bigint, TextOperation>();
  private readonly people = new Map<string, RemoteParticipant & { cursor?: DocCursor }>();
  private undoStack: TextOperation[] = [];
  private redoStack: TextOperation[] = [];
  private readonly changeListeners = new Set<(c: DocumentChange) => void>();
  private readonly peopleListeners = new Set<() => void>();
  private readonly errorListeners = new Set<(e: TuttiError) => void>();
  private readonly stops: Array<() => void> = [];
  private sending = false;
  private lastEditAt = -Infinity;
  private selection?: TextSelection;
  private flushTimer?: ReturnType<typeof setTimeout>;
  private groupOpen = false;
  private closedFlag = false;

  private constructor(
    private readonly tutti: Tutti,
    docId: string,
    clientId: string,
  ) {
    this.docId = docId;
    this.clientId = clientId;
  }

  /** Opens `docId` (NOT_FOUND unless it exists and is shared with the user). */
  static async open(tutti: Tutti, docId: string, clientId = randomId()): Promise<TuttiDocument> {
    const doc = new TuttiDocument(tutti, docId, clientId);
    doc.stops.push(tutti.onPush((p) => doc.onPush(p)));
    doc.stops.push(
      tutti.onDatagram((d) => {
        if (d.kind.case === "cursor" && d.kind.value.docId === docId) doc.onCursor(d.kind.value);
      }),
    );
    doc.stops.push(tutti.onReconnected((client) => doc.reopen(client)));
    try {
      const open = await tutti.call({ case: "docOpen", value: { docId } });
      doc.applyOpen(open, true);
    } catch (err) {
      doc.dispose();
      throw err;
    }
    return doc;
  }

  /** The local text (the server's at `revision`, plus own edits not yet acknowledged). */
  get text(): string {
    return this.textValue;
  }

  /** The last server revision applied. */
  get revision(): bigint {
    return this.ot.revision;
  }

  /** The user's role: VIEWER, EDITOR or OWNER. */
  get role(): DocRole {
    return this.roleValue;
  }

  /** Whether every own edit has been acknowledged. */
  get synchronized(): boolean {
    return this.ot.isSynchronized() && !this.sending;
  }

  /** The other sessions in the document, with their cursors in the local text. */
  participants(): RemoteParticipant[] {
    return [...this.people.values()].map((p) => {
      const out: RemoteParticipant = { userId: p.userId, sessionId: p.sessionId };
      const sel = p.cursor ? this.mapCursor(p.cursor) : undefined;
      if (sel) out.selection = sel;
      return out;
    });
  }

  /** Calls `listener` after every change of the text. */
  onChange(listener: (c: DocumentChange) => void): () => void {
    this.changeListeners.add(listener);
    return () => this.changeListeners.delete(listener);
  }

  /** Calls `listener` when someone joins, leaves or moves their cursor. */
  onParticipants(listener: () => void): () => void {
    this.peopleListeners.add(listener);
    return () => this.peopleListeners.delete(listener);
  }

  /** Errors of background sends (a refused operation, say). */
  onError(listener: (e: TuttiError) => void): () => void {
    this.errorListeners.add(listener);
    return () => this.errorListeners.delete(listener);
  }

  /**
   * Applies a local edit (its base length must be the text's length) and sends it.
   * It becomes one undo step.
   */
  edit(op: TextOperation): void {
    this.applyLocal(op, "edit");
  }

  /** Inserts `text` at code-point offset `at`. */
  insert(at: number, text: string): void {
    const n = [...this.textValue].length;
    this.edit(new TextOperation().retain(at).insert(text).retain(n - at));
  }

  /** Deletes `count` code points at `at`. */
  delete(at: number, count: number): void {
    const n = [...this.textValue].length;
    this.edit(new TextOperation().retain(at).delete(count).retain(n - at - count));
  }

  /**
   * Ends the current undo step: the next edit starts a new one (call it when the
   * caret moves other than by typing). Edits less than a second apart are
   * otherwise one step.
   */
  breakUndoGroup(): void {
    this.groupOpen = false;
  }

  /** Whether there is an own edit to undo. */
  get canUndo(): boolean {
    return this.undoStack.length > 0;
  }

  /** Whether there is an undone edit to redo. */
  get canRedo(): boolean {
    return this.redoStack.length > 0;
  }

  /**
   * Reverts the user's own last edit, transformed past everything others did since:
   * their edits stay. Returns the operation applied, or null.
   */
  undo(): TextOperation | null {
    const step = this.undoStack.pop();
    if (!step) return null;
    this.applyLocal(step, "undo");
    return step;
  }

  /** Re-applies the last undone edit. */
  redo(): TextOperation | null {
    const step = this.redoStack.pop();
    if (!step) return null;
    this.applyLocal(step, "redo");
    return step;
  }

  /** Sends the user's selection (code points) as a cursor datagram (rate-limited). */
  setSelection(selection: TextSelection): boolean {
    this.selection = selection;
    // Positions are meaningful to others only against a server revision: with own
    // edits in flight, the selection goes out once they are acknowledged.
    if (this.closedFlag || !this.ot.isSynchronized()) return false;
    const sent = this.tutti.sendCursor(this.docId, this.ot.revision, selection.anchor, selection.head);
    if (!sent) this.flushSelection(); // paced: the latest one goes out shortly
    return sent;
  }

  private flushSelection(): void {
    if (!this.selection || this.closedFlag) return;
    const sel = this.selection;
    // Past the datagram pacing interval, so that the last position is never dropped.
    if (this.flushTimer) clearTimeout(this.flushTimer);
    this.flushTimer = setTimeout(() => {
      this.flushTimer = undefined;
      if (this.selection === sel && this.ot.isSynchronized() && !this.closedFlag) {
        this.tutti.sendCursor(this.docId, this.ot.revision, sel.anchor, sel.head);
      }
    }, 60);
  }

  /** Leaves the document. */
  async close(): Promise<void> {
    if (this.closedFlag) return;
    this.dispose();
    if (this.tutti.state === "connected") {
      await this.tutti.call({ case: "docClose", value: { docId: this.docId } }).catch(() => {});
    }
  }

  // ------------------------------------------------------------ internals

  private dispose(): void {
    this.closedFlag = true;
    for (const stop of this.stops.splice(0)) stop();
  }

  private emit(change: DocumentChange): void {
    for (const l of [...this.changeListeners]) l(change);
  }

  private emitPeople(): void {
    for (const l of [...this.peopleListeners]) l();
  }

  private applyLocal(op: TextOperation, kind: "edit" | "undo" | "redo"): void {
    if (this.closedFlag) throw TuttiError.local("CLOSED", "the document is closed");
    if (this.roleValue === DocRole.VIEWER) throw new TuttiError(103, "PERMISSION_DENIED", "viewers cannot edit");
    if (op.isNoop()) return;
    const before = this.textValue;
    const after = op.apply(before);
    const inverse = op.invert(before);
    const out = this.ot.applyClient(op);
    this.textValue = after;
    const now = Date.now();
    if (kind === "undo") {
      this.redoStack.push(inverse);
      this.groupOpen = false;
    } else if (kind === "edit" && this.groupOpen && now - this.lastEditAt < UNDO_GROUP_MS && this.undoStack.length) {
      // Undoing the group undoes this edit, then the ones before it.
      this.undoStack.push(inverse.compose(this.undoStack.pop()!));
      this.redoStack = [];
    } else {
      this.undoStack.push(inverse);
      if (this.undoStack.length > UNDO_DEPTH) this.undoStack.shift();
      if (kind === "edit") this.redoStack = [];
      this.groupOpen = kind === "edit";
    }
    this.lastEditAt = now;
    this.emit({ op, remote: false });
    if (out) this.submit(out);
  }

  private submit(out: Outgoing): void {
    this.sending = true;
    this.tutti
      .call({
        case: "docSubmit",
        value: { docId: this.docId, baseRevision: out.baseRevision, op: toTextOp(out.op), clientId: this.clientId, seq: out.seq },
      })
      .then(
        () => {
          this.sending = false;
        },
        (err: unknown) => {
          this.sending = false;
          const e = err instanceof TuttiError ? err : TuttiError.local("SUBMIT_FAILED", String(err));
          // A lost connection re-sends from the reconnect hook.
          if (e.reconnect && e.source !== "server") return;
          if (e.source === "server" && e.code >= 3000) return;
          // The operation's base is older than the server's history: start over.
          if (e.code === RESYNC_REQUIRED) {
            this.resync(e).catch((r: unknown) => this.report(r));
            return;
          }
          this.report(e);
        },
      );
  }

  private applyOpen(open: DocOpenResponse, first: boolean): Outgoing | null {
    this.roleValue = open.role;
    this.people.clear();
    for (const p of open.participants) {
      if (p.sessionId === this.tutti.session?.welcome.sessionId) continue;
      const entry: RemoteParticipant & { cursor?: DocCursor } = { userId: p.userId, sessionId: p.sessionId };
      if (p.cursor) entry.cursor = p.cursor;
      this.people.set(p.sessionId, entry);
    }
    let next: Outgoing | null = null;
    if (open.state.case === "snapshot") {
      if (!first && !this.ot.isSynchronized()) {
        throw TuttiError.local("DIVERGED", "the server sent a snapshot while edits were pending");
      }
      const old = this.textValue;
      this.textValue = open.state.value;
      this.ot = new OtClient(open.revision, this.ot.nextSeq);
      this.early.clear();
      this.log.clear();
      if (!first && old !== this.textValue) {
        const n = [...old].length;
        this.emit({ op: new TextOperation().delete(n).insert(this.textValue), remote: true });
      }
    } else if (open.state.case === "catchUp") {
      for (const ev of open.state.value.operations) {
        const out = this.onOperation(ev);
        if (out) next = out;
      }
    }
    this.emitPeople();
    return next ?? this.ot.resend();
  }

  /** After a reconnect: open again from the revision we have, then resend. */
  private async reopen(client: TuttiClient): Promise<void> {
    if (this.closedFlag) return;
    try {
      const open = await client.call({ case: "docOpen", value: { docId: this.docId, knownRevision: this.ot.revision } });
      const out = this.applyOpen(open, false);
      if (out) this.submit(out);
    } catch (err) {
      if (err instanceof TuttiError && err.name === "DIVERGED") await this.resync(err);
      else this.report(err);
    }
  }

  /**
   * Starts over from the server's current text (after RESYNC_REQUIRED, or a snapshot
   * while edits were pending): unacknowledged own edits are dropped and reported.
   */
  private async resync(cause: TuttiError): Promise<void> {
    const open = await this.tutti.call({ case: "docOpen", value: { docId: this.docId } });
    if (open.state.case !== "snapshot") return;
    const old = this.textValue;
    const dropped = !this.ot.isSynchronized();
    this.textValue = open.state.value;
    this.ot = new OtClient(open.revision, this.ot.nextSeq);
    this.early.clear();
    this.log.clear();
    this.undoStack = [];
    this.redoStack = [];
    this.sending = false;
    if (old !== this.textValue) {
      this.emit({ op: new TextOperation().delete([...old].length).insert(this.textValue), remote: true });
    }
    if (dropped) {
      this.report(new TuttiError(cause.code, cause.name, `${cause.message}; unsent edits were dropped`, cause.source));
    }
  }

  private report(err: unknown): void {
    const e = err instanceof TuttiError ? err : TuttiError.local("DOCUMENT_ERROR", String(err));
    for (const l of [...this.errorListeners]) l(e);
  }

  private onPush(push: Push): void {
    const ev = push.event;
    switch (ev.case) {
      case "docOperation":
        if (ev.value.docId === this.docId) {
          const out = this.onOperation(ev.value);
          if (out) this.submit(out);
        }
        break;
      case "docPresence":
        if (ev.value.docId === this.docId) this.onPresence(ev.value);
        break;
      case "docCursor":
        if (ev.value.docId === this.docId) this.onCursor(ev.value);
        break;
    }
  }

  /** An operation from the server, applied in revision order. Returns the next op to send. */
  private onOperation(ev: DocOperation): Outgoing | null {
    if (ev.revision <= this.ot.revision) return null;
    this.early.set(ev.revision, ev);
    let next: Outgoing | null = null;
    for (;;) {
      const e = this.early.get(this.ot.revision + 1n);
      if (!e) break;
      this.early.delete(e.revision);
      const pending = this.ot.resend();
      const serverOp = fromTextOp(e.op);
      this.log.set(e.revision, serverOp);
      this.log.delete(e.revision - BigInt(OP_LOG));
      if (pending && e.clientId === this.clientId && e.seq === pending.seq) {
        next = this.ot.serverAck();
        if (!next) this.flushSelection();
      } else {
        const local = this.ot.applyServer(serverOp);
        this.textValue = local.apply(this.textValue);
        this.undoStack = transformStack(this.undoStack, local);
        this.redoStack = transformStack(this.redoStack, local);
        this.emit({ op: local, remote: true });
      }
    }
    return next;
  }

  private onPresence(p: DocPresence): void {
    if (p.sessionId === this.tutti.session?.welcome.sessionId) return;
    if (p.joined) this.people.set(p.sessionId, { userId: p.userId, sessionId: p.sessionId });
    else this.people.delete(p.sessionId);
    this.emitPeople();
  }

  private onCursor(c: DocCursor): void {
    if (c.sessionId === this.tutti.session?.welcome.sessionId) return;
    const entry = this.people.get(c.sessionId) ?? { userId: c.userId, sessionId: c.sessionId };
    const prev = entry.cursor;
    if (prev && prev.revision > c.revision) return; // an older datagram
    entry.cursor = c;
    this.people.set(c.sessionId, entry);
    this.emitPeople();
  }

  /** A cursor at server revision r, mapped through later server ops and own pending ones. */
  private mapCursor(c: DocCursor): TextSelection | undefined {
    let sel = new TextSelection(Number(c.anchor), Number(c.head));
    for (let r = c.revision + 1n; r <= this.ot.revision; r++) {
      const op = this.log.get(r);
      if (!op) return undefined; // too old to place
      sel = sel.transform(op, false);
    }
    return this.ot.transformSelection(sel);
  }
}
