// src/cm-ot.ts: CodeMirror changes (UTF-16) to operations (code points) and back,
// with astral characters (emoji), ZWJ sequences, CJK and combining marks.
import { test } from "node:test";
import assert from "node:assert/strict";
import { importBundle } from "../tools/import-ts.mjs";

const { changesToOp, opToChanges, EditorState, TextOperation } = await importBundle(`
  export * from "./src/cm-ot";
  export { TextOperation } from "./src/ot";
  export { EditorState } from "@codemirror/state";
`, "cm-ot-test");

const samples = ["", "plain", "a🎉b", "👩‍👩‍👧 family", "你好世界", "e\u0301te\u0301", "🎉🎉🎉", "x👍🏽y"];

/** Random CodeMirror changes on `text` (never splitting a surrogate pair). */
function randomChanges(state, rnd) {
  const text = state.doc.toString();
  const bounds = [0];
  for (let i = 0; i < text.length;) {
    i += text.codePointAt(i) > 0xffff ? 2 : 1;
    bounds.push(i);
  }
  const specs = [];
  let from = 0;
  const pieces = ["🎉", "中", "e\u0301", "z", "👩‍👧"];
  while (from <= text.length && specs.length < 3) {
    const candidates = bounds.filter((b) => b >= from);
    if (!candidates.length) break;
    const a = candidates[Math.floor(rnd() * candidates.length)];
    const rest = bounds.filter((b) => b >= a);
    const b = rest[Math.floor(rnd() * Math.min(rest.length, 3))];
    const insert = rnd() < 0.7 ? pieces[Math.floor(rnd() * pieces.length)] : "";
    if (a === b && !insert) { from = a + 1; continue; }
    specs.push({ from: a, to: b, insert });
    from = b + 1;
  }
  return state.changes(specs);
}

test("a CodeMirror change and its operation give the same text, and back", () => {
  let seed = 7;
  const rnd = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
  let checked = 0;
  for (const sample of samples) {
    for (let round = 0; round < 40; round++) {
      const state = EditorState.create({ doc: sample });
      const changes = randomChanges(state, rnd);
      const op = changesToOp(changes, sample);
      const viaEditor = changes.apply(state.doc).toString();
      assert.equal(op.baseLength, Array.from(sample).length);
      assert.equal(op.apply(sample), viaEditor, `${JSON.stringify(sample)}: ${op}`);
      const back = state.update({ changes: opToChanges(op, sample) }).state.doc.toString();
      assert.equal(back, viaEditor);
      checked++;
    }
  }
  assert.equal(checked, samples.length * 40);
});

test("positions: an insert after an emoji lands after it, not inside it", () => {
  const state = EditorState.create({ doc: "🎉x" });
  const op = changesToOp(state.changes({ from: 2, insert: "!" }), "🎉x");
  assert.deepEqual(op.toJSON(), [1, "!", 1]);
  assert.deepEqual(opToChanges(new TextOperation().retain(1).insert("!").retain(1), "🎉x"), [{ from: 2, insert: "!" }]);
});
