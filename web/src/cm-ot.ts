// Between CodeMirror 6 and Tutti's operations: CodeMirror counts UTF-16 code units,
// the protocol counts Unicode scalar values (code points).

import type { ChangeSet } from "@codemirror/state";
import { TextOperation, charLength, codePointToUtf16Offset, toWellFormed, utf16ToCodePointOffset } from "./ot";

/** CodeMirror changes (UTF-16, on `oldText`) as an operation on code points. */
export function changesToOp(changes: ChangeSet, oldText: string): TextOperation {
  const op = new TextOperation();
  let pos = 0;
  changes.iterChanges((fromA, toA, _fromB, _toB, inserted) => {
    const from = utf16ToCodePointOffset(oldText, fromA);
    const to = utf16ToCodePointOffset(oldText, toA);
    op.retain(from - pos);
    const text = toWellFormed(inserted.toString());
    if (text) op.insert(text);
    op.delete(to - from);
    pos = to;
  });
  op.retain(charLength(oldText) - pos);
  return op;
}

/** An operation on code points as CodeMirror changes on `text` (UTF-16). */
export function opToChanges(op: TextOperation, text: string): Array<{ from: number; to?: number; insert?: string }> {
  const out: Array<{ from: number; to?: number; insert?: string }> = [];
  let cp = 0;
  for (const c of op.components()) {
    if (c.type === "retain") cp += c.n;
    else if (c.type === "insert") out.push({ from: codePointToUtf16Offset(text, cp), insert: c.text });
    else {
      out.push({ from: codePointToUtf16Offset(text, cp), to: codePointToUtf16Offset(text, cp + c.n) });
      cp += c.n;
    }
  }
  return out;
}
