// Unit tests of src/framing.ts (varint codec and incremental frame decoder).
import { test } from "node:test";
import assert from "node:assert/strict";
import { importTs } from "../tools/import-ts.mjs";

const { encodeVarint, readVarint, encodeFrame, FrameDecoder, FrameError, varintLength } =
  await importTs("framing");

const hex = (bytes) => Buffer.from(bytes).toString("hex");

test("varint encodes known values (protobuf spec examples)", () => {
  assert.equal(hex(encodeVarint(0)), "00");
  assert.equal(hex(encodeVarint(1)), "01");
  assert.equal(hex(encodeVarint(127)), "7f");
  assert.equal(hex(encodeVarint(128)), "8001");
  assert.equal(hex(encodeVarint(150)), "9601");
  assert.equal(hex(encodeVarint(300)), "ac02");
  assert.equal(hex(encodeVarint(16384)), "808001");
  assert.equal(hex(encodeVarint(2 ** 32)), "8080808010");
  assert.equal(hex(encodeVarint(Number.MAX_SAFE_INTEGER)), "ffffffffffffff0f");
  assert.equal(hex(encodeVarint(2n ** 64n - 1n)), "ffffffffffffffffff01");
  assert.equal(hex(encodeVarint(300n)), "ac02");
});

test("varint rejects negative, fractional and too-large values", () => {
  assert.throws(() => encodeVarint(-1), RangeError);
  assert.throws(() => encodeVarint(1.5), RangeError);
  assert.throws(() => encodeVarint(2 ** 53), RangeError);
  assert.throws(() => encodeVarint(-1n), RangeError);
  assert.throws(() => encodeVarint(2n ** 64n), RangeError);
});

test("varint round-trips and reports its size", () => {
  const values = [0, 1, 127, 128, 255, 256, 16383, 16384, 2 ** 21, 2 ** 28 - 1, 2 ** 31,
    2 ** 32 - 1, 2 ** 32, 2 ** 35 + 7, 2 ** 49, Number.MAX_SAFE_INTEGER];
  for (const v of values) {
    const bytes = encodeVarint(v);
    assert.equal(bytes.length, varintLength(v), `size of ${v}`);
    assert.equal(hex(encodeVarint(BigInt(v))), hex(bytes), `bigint ${v}`);
    const padded = new Uint8Array([9, 9, ...bytes, 5]);
    assert.deepEqual(readVarint(padded, 2), { value: v, size: bytes.length });
  }
});

test("readVarint needs more bytes on a truncated varint", () => {
  assert.equal(readVarint(new Uint8Array([])), undefined);
  assert.equal(readVarint(new Uint8Array([0x80])), undefined);
  assert.equal(readVarint(new Uint8Array([0xff, 0xff, 0xff])), undefined);
});

test("readVarint rejects over-long encodings", () => {
  const eleven = new Uint8Array(11).fill(0x80);
  assert.throws(() => readVarint(eleven), (e) => e instanceof FrameError && e.kind === "bad_length");
  const tenthByteTooBig = new Uint8Array([...new Array(9).fill(0x80), 0x02]);
  assert.throws(() => readVarint(tenthByteTooBig), FrameError);
  // Lengths above 2^53 are refused rather than rounded.
  assert.throws(() => readVarint(encodeVarint(2n ** 60n)), FrameError);
});

test("encodeFrame prefixes the length", () => {
  assert.equal(hex(encodeFrame(new Uint8Array([1, 2, 3]))), "03010203");
  assert.equal(hex(encodeFrame(new Uint8Array([]))), "00");
  const big = encodeFrame(new Uint8Array(300));
  assert.equal(hex(big.subarray(0, 2)), "ac02");
  assert.equal(big.length, 302);
});

function frames(...bodies) {
  return Buffer.concat(bodies.map((b) => encodeFrame(Uint8Array.from(b))));
}

test("decoder returns several frames from one chunk, including empty ones", () => {
  const d = new FrameDecoder(1024);
  const out = d.push(frames([1], [], [2, 3], [4, 5, 6]));
  assert.deepEqual(out.map((f) => [...f]), [[1], [], [2, 3], [4, 5, 6]]);
  assert.equal(d.buffered, 0);
});

test("decoder reassembles frames split at every byte boundary", () => {
  const bodies = [[7], new Array(200).fill(1), [], new Array(130).fill(2), [9, 9]];
  const stream = frames(...bodies);
  for (let chunkSize = 1; chunkSize <= stream.length; chunkSize++) {
    const d = new FrameDecoder(1024);
    const got = [];
    for (let i = 0; i < stream.length; i += chunkSize) {
      got.push(...d.push(stream.subarray(i, i + chunkSize)));
    }
    assert.deepEqual(got.map((f) => [...f]), bodies, `chunk size ${chunkSize}`);
    assert.equal(d.buffered, 0);
  }
});

test("decoder keeps a partial frame until it completes", () => {
  const d = new FrameDecoder(1024);
  const stream = frames([1, 2, 3, 4], [5]);
  assert.deepEqual(d.push(stream.subarray(0, 1)), []); // only the prefix
  assert.deepEqual(d.push(stream.subarray(1, 3)), []);
  assert.equal(d.buffered, 3);
  const out = d.push(stream.subarray(3, 7));
  assert.deepEqual(out.map((f) => [...f]), [[1, 2, 3, 4], [5]]);
});

test("returned frames are copies that survive later pushes", () => {
  const d = new FrameDecoder(1024);
  const [first] = d.push(frames([1, 2, 3]));
  d.push(frames([9, 9, 9], [8, 8, 8]));
  assert.deepEqual([...first], [1, 2, 3]);
});

test("decoder rejects a frame above the limit before its body arrives", () => {
  const d = new FrameDecoder(10);
  assert.deepEqual(d.push(frames(new Array(10).fill(1))).length, 1); // exactly the limit
  const prefixOnly = encodeVarint(11);
  assert.throws(() => d.push(prefixOnly), (e) => e instanceof FrameError && e.kind === "too_large");
});

test("decoder rejects a corrupt length prefix", () => {
  const d = new FrameDecoder(1024);
  assert.throws(() => d.push(new Uint8Array(10).fill(0xff)), FrameError);
});

test("decoder limit can be changed between chunks (Welcome announces it)", () => {
  const d = new FrameDecoder(4);
  d.maxFrameSize = 100;
  assert.equal(d.push(frames(new Array(50).fill(3))).length, 1);
});
