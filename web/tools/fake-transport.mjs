// Test helper: an in-memory fake of a WebTransport session speaking the Tutti
// framing (node web streams), for unit tests of the client without a browser or a
// server. Kept out of test/ so that `node --test test/` does not run it as a test.
import { importBundle } from "./import-ts.mjs";

const m = await importBundle(`
  export * from "./src/framing";
  export * from "./src/gen/tutti/v1/frames_pb";
  export { create, toBinary, fromBinary } from "@bufbuild/protobuf";
`, "fake-transport");
const {
  FrameDecoder, encodeFrame, create, toBinary, fromBinary,
  ClientFrameSchema, ServerFrameSchema, DatagramSchema, PushSchema, PushStreamHeaderSchema,
} = m;

export function deferred() {
  let resolve, reject;
  const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
  return { promise, resolve, reject };
}

export const serverFrame = (kind) => encodeFrame(toBinary(ServerFrameSchema, create(ServerFrameSchema, { kind })));
export const welcomeFrame = (extra = {}) => serverFrame({
  case: "welcome",
  value: { sessionId: "s-1", userId: "alice", nodeId: "node-a", protocolVersion: 1,
    limits: { maxFrameSize: 65536, maxDatagramSize: 1200, maxInflightRequests: 64 }, ...extra },
});

/**
 * A fake WebTransport session. `onClientFrame(frame, server)` is called for every
 * ClientFrame the client writes on the control stream; `server.send(bytes)` writes
 * raw bytes back (already framed), `server.sendChunked` splits them.
 */
export class FakeWebTransport {
  constructor({ onClientFrame = () => {}, onDatagram = () => {}, ready = Promise.resolve() } = {}) {
    this.ready = ready;
    this.closedD = deferred();
    this.closed = this.closedD.promise;
    this.drainingD = deferred();
    this.draining = this.drainingD.promise;
    this.closeCalls = [];
    this.clientFrames = [];
    this.onClientFrame = onClientFrame;
    this.onDatagram = onDatagram;
    let uniController;
    this.incomingUnidirectionalStreams = new ReadableStream({ start: (c) => { uniController = c; } });
    this.uni = uniController;
    let dgController;
    this.datagrams = {
      readable: new ReadableStream({ start: (c) => { dgController = c; } }),
      writable: new WritableStream({
        write: (chunk) => this.onDatagram(fromBinary(DatagramSchema, chunk), this),
      }),
    };
    this.dg = dgController;
  }

  async createBidirectionalStream() {
    const decoder = new FrameDecoder(1 << 20);
    let toClient;
    const readable = new ReadableStream({ start: (c) => { toClient = c; } });
    this.toClient = toClient;
    const writable = new WritableStream({
      write: (chunk) => {
        for (const body of decoder.push(chunk)) {
          const frame = fromBinary(ClientFrameSchema, body);
          this.clientFrames.push(frame);
          this.onClientFrame(frame, this);
        }
      },
    });
    return { readable, writable };
  }

  send(bytes) { try { this.toClient.enqueue(Uint8Array.from(bytes)); } catch {} }
  sendChunked(bytes, size = 1) {
    for (let i = 0; i < bytes.length; i += size) this.send(bytes.subarray(i, i + size));
  }
  endControl() { try { this.toClient.close(); } catch {} }
  sendDatagram(msg) { this.dg.enqueue(toBinary(DatagramSchema, create(DatagramSchema, msg))); }
  openPushStream(kind, pushes) {
    const chunks = [encodeFrame(toBinary(PushStreamHeaderSchema, create(PushStreamHeaderSchema, { kind })))];
    for (const p of pushes) chunks.push(encodeFrame(toBinary(PushSchema, create(PushSchema, p))));
    const all = Buffer.concat(chunks);
    this.uni.enqueue(new ReadableStream({
      start(c) { c.enqueue(Uint8Array.from(all.subarray(0, 3))); c.enqueue(Uint8Array.from(all.subarray(3))); c.close(); },
    }));
  }
  /** The server closes the session (as wtransport's close with a code). */
  serverClose(closeCode, reason = "") {
    try { this.toClient.error(new Error("session closed")); } catch {}
    this.closedD.resolve({ closeCode, reason });
  }
  /** The network is lost: the streams fail and `closed` rejects, as in browsers. */
  lose() {
    try { this.toClient.error(new Error("connection lost")); } catch {}
    this.closedD.reject(new Error("connection lost"));
  }
  /** The server asks the session to drain (WebTransport.draining settles). */
  drain() { this.drainingD.resolve(); }
  close(info) {
    this.closeCalls.push(info);
    try { this.toClient?.error(new Error("closed locally")); } catch {}
    this.closedD.resolve(info ?? { closeCode: 0, reason: "" });
  }
}

/** A server that welcomes on Hello and answers echo requests. */
export function welcomingServer(extra) {
  return (frame, s) => {
    if (frame.kind.case === "hello") s.send(welcomeFrame(extra));
    if (frame.kind.case === "request") {
      const { id, body } = frame.kind.value;
      s.send(serverFrame({ case: "response", value: { id, body: { case: "echo", value: { payload: body.value.payload } } } }));
    }
  };
}

