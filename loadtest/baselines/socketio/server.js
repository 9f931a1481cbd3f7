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
// Usage: node server.js [--port 0] [--host 127.0.0.1] [--backlog 1024] [--tls DIR]

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
});

let connected = 0;
io.on('connection', (socket) => {
  connected++;
  const room = String((socket.handshake.auth && socket.handshake.auth.room) ?? 'default');
  socket.data.room = room;
  socket.join(room);
  socket.on('m', (payload) => {
    io.to(room).emit('m', payload);
  });
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
process.on('SIGUSR2', () => process.stderr.write(`connected=${connected}\n`));
