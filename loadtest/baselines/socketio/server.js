#!/usr/bin/env node
// Socket.IO 4.8 baseline server for Tutti's benchmarks.
//
// - websocket transport only (no HTTP long-polling, no upgrade dance)
// - a client names its room in the handshake (`auth: { room }`) and is joined to it
//   during the connection handler, before its CONNECT packet is processed by the client
// - every "m" event is broadcast with `io.to(room).emit("m", payload)`, which includes the
//   sender (one send into a room of 10 = 10 deliveries)
// - listens on loopback only; prints one JSON line `{"ready":true,"port":N,"pid":P}` on
//   stdout once listening, and exits when its stdin closes (so a dead parent never leaves
//   it behind) or on SIGTERM/SIGINT.
//
// - with `--tls DIR` (key.pem and cert.pem in DIR) it serves wss:// over TLS, as
//   deployed; Node's defaults otherwise (TLS 1.3 with the client's choice of suite)
//
// Optional, off by default (load.js turns them on only for runs that use them, so a run
// without them costs exactly what it did before):
// - `--typing 1`: every "t" event (a typing indicator) is relayed to the room's other
//   members as a volatile event, `socket.to(room).volatile.emit("t", payload)` (dropped for
//   a member whose transport is busy writing, as Socket.IO does)
// - `--history N`: per room, a ring of the payloads of the last N "m" events (in memory:
//   Socket.IO has no storage); an "h" event with an ack callback is answered with that
//   page, oldest first. A ring goes when its room does (the last member left).
// - `--recovery 1`: Socket.IO's Connection State Recovery (socket.io >= 4.6), as for a
//   client that must reconnect after its address changed (load.js `rebind_at`):
//   `connectionStateRecovery: { maxDisconnectionDuration: 2 min, skipMiddlewares: true }`.
//   The CONNECT ack then carries a session id `pid`, every stored broadcast gets an
//   offset appended as its last argument (42["m","<payload>","<offset>"]; not volatile
//   events, not acks), and a CONNECT whose auth has the `pid` and the last `offset` of a
//   session that ended within 2 min ("transport close"/"transport error") gets the same
//   socket id, its rooms and data back and the missed packets replayed (written before
//   the CONNECT ack); `socket.recovered` is then true.
//
// Usage: node server.js [--port 0] [--host 127.0.0.1] [--backlog 1024] [--tls DIR]
//                       [--typing 0|1] [--history N] [--recovery 0|1]

'use strict';

const http = require('node:http');
const { Server } = require('socket.io');

function arg(name, def) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : def;
}

const host = arg('host', '127.0.0.1');
const port = Number(arg('port', '0'));
const backlog = Number(arg('backlog', '1024'));
const typing = arg('typing', '0') === '1';
const historyN = Number(arg('history', '0'));
const recovery = arg('recovery', '0') === '1';
if (!Number.isInteger(historyN) || historyN < 0 || historyN > 10000) {
  console.error('--history: 0 (off) .. 10000 messages per room');
  process.exit(2);
}

// Loopback, or 10.77.0.0/16: the addresses loadtest/impair/netns.sh gives the
// network namespaces it creates for impaired runs.
if (!['127.0.0.1', 'localhost', '::1'].includes(host) && !host.startsWith('127.') && !host.startsWith('10.77.')) {
  console.error(`refusing to listen on non-loopback host ${host}`);
  process.exit(2);
}

const tlsDir = arg('tls', null);
const notFound = (req, res) => {
  res.writeHead(404);
  res.end();
};
const httpServer = tlsDir
  ? require('node:https').createServer({
    key: require('node:fs').readFileSync(require('node:path').join(tlsDir, 'key.pem')),
    cert: require('node:fs').readFileSync(require('node:path').join(tlsDir, 'cert.pem')),
  }, notFound)
  : http.createServer(notFound);

const io = new Server(httpServer, {
  transports: ['websocket'],
  serveClient: false,
  perMessageDeflate: false,
  httpCompression: false,
  cors: undefined,
  // only with --recovery 1: it swaps in the SessionAwareAdapter, which stores every
  // broadcast for maxDisconnectionDuration (a cost a run without it must not pay)
  ...(recovery ? { connectionStateRecovery: { maxDisconnectionDuration: 2 * 60 * 1000, skipMiddlewares: true } } : {}),
});

// room -> { buf, start, len }: the last historyN "m" payloads of the room
const rings = new Map();
if (historyN > 0) io.of('/').adapter.on('delete-room', (room) => rings.delete(room));

function remember(room, payload) {
  let r = rings.get(room);
  if (r === undefined) rings.set(room, r = { buf: new Array(historyN), start: 0, len: 0 });
  if (r.len < historyN) {
    r.buf[(r.start + r.len) % historyN] = payload;
    r.len++;
  } else {
    r.buf[r.start] = payload;
    r.start = (r.start + 1) % historyN;
  }
}

function page(room) {
  const r = rings.get(room);
  if (r === undefined) return [];
  const out = new Array(r.len);
  for (let i = 0; i < r.len; i++) out[i] = r.buf[(r.start + i) % historyN];
  return out;
}

let connected = 0;
let recovered = 0;
io.on('connection', (socket) => {
  connected++;
  const room = String((socket.handshake.auth && socket.handshake.auth.room) ?? 'default');
  if (socket.recovered) {
    // Socket.IO has already put the socket back into the rooms of its session (its own
    // id and `room`) and restored socket.data; a second join would be a no-op (a room is
    // a Set of socket ids), so the client is in its room exactly once either way.
    recovered++;
  } else {
    socket.data.room = room;
    socket.join(room);
  }
  if (historyN > 0) {
    socket.on('m', (payload) => {
      remember(room, payload);
      io.to(room).emit('m', payload);
    });
    socket.on('h', (...args) => {
      const ack = args[args.length - 1];
      if (typeof ack === 'function') ack(page(room));
    });
  } else {
    socket.on('m', (payload) => {
      io.to(room).emit('m', payload);
    });
  }
  if (typing) {
    socket.on('t', (payload) => {
      socket.to(room).volatile.emit('t', payload);
    });
  }
  socket.on('disconnect', () => {
    connected--;
  });
});

httpServer.listen({ host, port, backlog }, () => {
  const addr = httpServer.address();
  process.stdout.write(JSON.stringify({ ready: true, port: addr.port, pid: process.pid }) + '\n');
});

function shutdown() {
  io.close();
  httpServer.close();
  setTimeout(() => process.exit(0), 200).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
// Exit with the parent: when spawned with a stdin pipe, EOF on stdin means the parent is gone.
if (!process.stdin.isTTY) {
  process.stdin.on('end', shutdown);
  process.stdin.on('error', shutdown);
  process.stdin.resume();
}
// Optional status on SIGUSR2 to stderr (connected sockets), for debugging.
process.on('SIGUSR2', () => process.stderr.write(`connected=${connected}${recovery ? ` recovered=${recovered}` : ''}\n`));
