// Length-prefixed framing used on every Tutti stream: each protobuf message is
// preceded by its byte length as a protobuf varint (unsigned LEB128).
//
// Pure module (no DOM, no protobuf): it runs unchanged in browsers and in node.

/** The longest encoding of a 64-bit varint. */
export const MAX_VARINT_LEN = 10;

/** Default frame limit before the server announced its own (Welcome.limits). */
export const DEFAULT_MAX_FRAME_SIZE = 1 << 20;

/** Why a byte sequence could not be framed or unframed. */
export type FrameErrorKind = "too_large" | "bad_length";

/** A framing error. `bad_length` means the stream cannot be resynchronised. */
export class FrameError extends Error {
  readonly kind: FrameErrorKind;
  constructor(kind: FrameErrorKind, message: string) {
    super(message);
    this.name = "FrameError";
    this.kind = kind;
  }
}

const TWO_POW_32 = 0x1_0000_0000;

/**
 * Encodes an unsigned integer as a varint. Numbers must be safe integers
 * (< 2^53); use a bigint for the full 64-bit range.
 */
export function encodeVarint(value: number | bigint): Uint8Array {
  if (typeof value === "bigint") {
    if (value < 0n || value >= 1n << 64n) {
      throw new RangeError(`varint out of range: ${value}`);
    }
    const out: number[] = [];
    let v = value;
    while (v >= 0x80n) {
      out.push(Number(v & 0x7fn) | 0x80);
      v >>= 7n;
    }
    out.push(Number(v));
    return Uint8Array.from(out);
  }
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new RangeError(`varint out of range: ${value}`);
  }
  const out: number[] = [];
  let v = value;
  // Bit operators work on 32 bits: split with division above that.
  while (v >= TWO_POW_32) {
    out.push((v % 0x80) | 0x80);
    v = Math.floor(v / 0x80);
  }
  while (v >= 0x80) {
    out.push((v & 0x7f) | 0x80);
    v >>>= 7;
  }
  out.push(v);
  return Uint8Array.from(out);
}

/** The number of bytes `encodeVarint(value)` produces. */
export function varintLength(value: number): number {
  let n = 1;
  let v = value;
  while (v >= 0x80) {
    v = Math.floor(v / 0x80);
    n++;
  }
  return n;
}

/** A decoded varint: its value and how many bytes it took. */
export interface Varint {
  value: number;
  size: number;
}

/**
 * Reads a varint at `offset`. Returns `undefined` when more bytes are needed.
 * Throws `FrameError("bad_length")` on an over-long encoding, and on a value above
 * Number.MAX_SAFE_INTEGER (this reader is for lengths).
 */
export function readVarint(buf: Uint8Array, offset = 0): Varint | undefined {
  let value = 0;
  let scale = 1;
  for (let i = 0; i < MAX_VARINT_LEN; i++) {
    const pos = offset + i;
    if (pos >= buf.length) return undefined;
    const byte = buf[pos]!;
    if (i === MAX_VARINT_LEN - 1 && byte > 1) {
      throw new FrameError("bad_length", "varint longer than 64 bits");
    }
    value += (byte & 0x7f) * scale;
    if (value > Number.MAX_SAFE_INTEGER) {
      throw new FrameError("bad_length", "length prefix too large");
    }
    if ((byte & 0x80) === 0) return { value, size: i + 1 };
    scale *= 0x80;
  }
  throw new FrameError("bad_length", "varint longer than 10 bytes");
}

/** Prefixes `body` with its length. */
export function encodeFrame(body: Uint8Array): Uint8Array {
  const prefix = encodeVarint(body.length);
  const out = new Uint8Array(prefix.length + body.length);
  out.set(prefix, 0);
  out.set(body, prefix.length);
  return out;
}

/**
 * Splits a byte stream into frame bodies. Incremental: feed chunks as they arrive
 * (a chunk may hold part of a frame, or several frames); `push` returns the frames
 * completed so far. A length prefix above `maxFrameSize` throws
 * `FrameError("too_large")` before the body is buffered.
 */
export class FrameDecoder {
  maxFrameSize: number;
  private buf: Uint8Array = new Uint8Array(0);
  private start = 0;
  private end = 0;

  constructor(maxFrameSize: number = DEFAULT_MAX_FRAME_SIZE) {
    this.maxFrameSize = maxFrameSize;
  }

  /** Bytes received but not yet returned as a frame. */
  get buffered(): number {
    return this.end - this.start;
  }

  /** Appends `chunk` and returns every frame it completes, in order. */
  push(chunk: Uint8Array): Uint8Array[] {
    this.append(chunk);
    const frames: Uint8Array[] = [];
    for (;;) {
      const view = this.buf.subarray(this.start, this.end);
      const prefix = readVarint(view, 0);
      if (prefix === undefined) break;
      if (prefix.value > this.maxFrameSize) {
        throw new FrameError(
          "too_large",
          `frame of ${prefix.value} bytes exceeds the limit of ${this.maxFrameSize} bytes`,
        );
      }
      const total = prefix.size + prefix.value;
      if (view.length < total) break;
      // Copy out so that the caller may keep the frame after the buffer is reused.
      frames.push(view.slice(prefix.size, total));
      this.start += total;
    }
    if (this.start === this.end) {
      this.start = 0;
      this.end = 0;
    }
    return frames;
  }

  private append(chunk: Uint8Array): void {
    if (chunk.length === 0) return;
    if (this.end + chunk.length > this.buf.length) {
      const live = this.end - this.start;
      const needed = live + chunk.length;
      if (needed <= this.buf.length) {
        this.buf.copyWithin(0, this.start, this.end);
      } else {
        const grown = new Uint8Array(Math.max(needed, this.buf.length * 2, 256));
        grown.set(this.buf.subarray(this.start, this.end), 0);
        this.buf = grown;
      }
      this.start = 0;
      this.end = live;
    }
    this.buf.set(chunk, this.end);
    this.end += chunk.length;
  }
}
