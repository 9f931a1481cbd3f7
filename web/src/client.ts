// TuttiClient: a small typed client for the Tutti server over WebTransport.
//
//   const client = await TuttiClient.connect({ url, token, certificateHashes });
//   const echo = await client.echo("hi");
//   client.onPush((push, kind) => console.log(kind, push));
//   const rttMs = await client.pingDatagram();
//   client.close();
//
// The wire contract is proto/tutti/v1/frames.proto: length-prefixed ClientFrame /
// ServerFrame messages on the control stream (the client's first bidirectional
// stream), PushStreamHeader + Push frames on server-opened unidirectional streams,
// one Datagram message per datagram.

import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import type { DescMessage, MessageInitShape, MessageShape } from "@bufbuild/protobuf";
import {
  ClientFrameSchema,
  DatagramSchema,
  PushSchema,
  PushStreamHeaderSchema,
  RequestSchema,
  ServerFrameSchema,
  StreamKind,
} from "./gen/tutti/v1/frames_pb";
import type {
  Datagram,
  EchoResponse,
  Node as ClusterNode,
  Push,
  Response,
  ServerFrame,
  Welcome,
} from "./gen/tutti/v1/frames_pb";
import type {
  AnalyticsEvent,
  AnalyticsTrackResponse,
  LatencySummary,
  MetricValue,
  MetricsSubscribeResponse,
  MetricsUpdate,
} from "./gen/tutti/v1/analytics_pb";
import { closeCodeName, errorCodeName, shouldReconnect } from "./codes";
import { DEFAULT_MAX_FRAME_SIZE, FrameDecoder, FrameError, encodeFrame } from "./framing";

export { StreamKind };
export type { ClusterNode, Datagram, EchoResponse, Push, Response, Welcome };
export type {
  AnalyticsEvent,
  AnalyticsTrackResponse,
  LatencySummary,
  MetricValue,
  MetricsSubscribeResponse,
  MetricsUpdate,
};
export * from "./ot"; // operational transformation (TextOperation, OtClient, UTF-16 helpers)

/** Sent in Hello.client.version. */
export const CLIENT_VERSION = "0.1.0";
/** The protocol version this client speaks. */
export const PROTOCOL_VERSION = 1;

/** Where an error was decided: by the server (a frame or close code) or by this client. */
export type TuttiErrorSource = "server" | "client";

/** CloseCode GOING_AWAY: the server is shutting down or draining. */
export const GOING_AWAY = 3000;
/** CloseCode REDIRECT: a node of a cluster over its share of sessions sends the client on. */
export const REDIRECT = 3007;

/** What a server `Close` frame adds to its code (see `TuttiError`). */
export interface CloseDetails {
  /** With GOING_AWAY from a draining node: wait this long before reconnecting, in ms. */
  retryAfterMs?: number;
  /** With GOING_AWAY and REDIRECT in a cluster: the nodes to go to, best first. */
  nodes?: readonly ClusterNode[];
}

/**
 * A typed Tutti error. For server errors `code` and `name` are the protocol's
 * (ErrorCode or CloseCode, e.g. 3501 "UNAUTHORIZED"); client-side errors have code
 * 0 and a name such as "CONNECT_FAILED", "CONNECTION_LOST", "TIMEOUT", "CLOSED".
 */
export class TuttiError extends Error {
  readonly code: number;
  override readonly name: string;
  readonly source: TuttiErrorSource;
  /** Whether reconnecting (with backoff) may help. */
  readonly reconnect: boolean;
  /**
   * From a `Close` with GOING_AWAY sent by a draining node of a cluster: how long
   * to wait before reconnecting, in ms (0: not said).
   */
  readonly retryAfterMs: number;
  /**
   * From a `Close` with GOING_AWAY or REDIRECT in a cluster: the nodes to go to,
   * best first (empty otherwise).
   */
  readonly nodes: readonly ClusterNode[];

  constructor(
    code: number,
    name: string,
    message: string,
    source: TuttiErrorSource = "server",
    reconnect?: boolean,
    details: CloseDetails = {},
  ) {
    super(message);
    this.code = code;
    this.name = name;
    this.source = source;
    this.reconnect = reconnect ?? (source === "server" ? shouldReconnect(code) : false);
    this.retryAfterMs = details.retryAfterMs ?? 0;
    this.nodes = details.nodes ?? [];
  }

  override toString(): string {
    const code = this.source === "server" ? ` (${this.code})` : "";
    return `${this.name}${code}: ${this.message}`;
  }

  /** A client-side error. */
  static local(name: string, message: string, reconnect = false): TuttiError {
    return new TuttiError(0, name, message, "client", reconnect);
  }
}

/** The subset of the WebTransport API this client uses (injectable for tests). */
export interface WebTransportLike {
  readonly ready: Promise<unknown>;
  readonly closed: Promise<WebTransportCloseInfo>;
  readonly datagrams: {
    readonly readable: ReadableStream;
    readonly writable?: WritableStream;
    createWritable?: () => WritableStream;
  };
  readonly incomingUnidirectionalStreams: ReadableStream;
  /** Settles when the server asks the session to drain (going away); optional. */
  readonly draining?: Promise<unknown>;
  createBidirectionalStream(): Promise<{ readable: ReadableStream; writable: WritableStream }>;
  close(closeInfo?: WebTransportCloseInfo): void;
}

export type WebTransportFactory = (url: string, options: WebTransportOptions) => WebTransportLike;

export interface ConnectOptions {
  /** The WebTransport endpoint, e.g. "https://127.0.0.1:4433/tutti". */
  url: string;
  /** A token from the server (`tutti token`, or /api/dev/token in development). */
  token: string;
  /**
   * Called ahead of the token's expiry (`Welcome.tokenExpiresAtMs`) for a later
   * token of the same user, which replaces the session's through `refreshToken`.
   * Without it the server closes the session with TOKEN_EXPIRED at expiry.
   */
  getToken?: () => string | Promise<string>;
  /**
   * SHA-256 hashes of the server's certificate (bytes, or hex strings), for
   * self-signed development certificates; see `fetchCertificateHashes`.
   */
  certificateHashes?: ReadonlyArray<Uint8Array | string>;
  /** Where the client left off, per stream ("room/<id>" -> offset). */
  resume?: Readonly<Record<string, bigint>>;
  /** How long to wait for Welcome, in ms (default 10000). */
  handshakeTimeoutMs?: number;
  /** The largest frame accepted before Welcome announces the limit (default 1 MiB). */
  maxFrameSize?: number;
  /** Creates the transport; defaults to `new WebTransport(url, options)`. */
  transport?: WebTransportFactory;
  /**
   * Follow a REDIRECT (default true): a node of a cluster over its share of the
   * sessions answers Hello with `Close` REDIRECT and the less loaded nodes, best
   * first; `connect` then opens the session on the first of them instead (see
   * `optionsForNode`), once: a second REDIRECT rejects.
   */
  followRedirect?: boolean;
}

/**
 * `options` aimed at another node of the cluster (from `Welcome.nodes` or a
 * `Close`): its WebTransport URL and, when `options` pins certificates, the node's
 * own pin (`cert_hash`) in their place. Undefined when the node has no URL, or
 * when a pin is needed and the node has none.
 */
export function optionsForNode(options: ConnectOptions, node: ClusterNode): ConnectOptions | undefined {
  if (!node.webtransportUrl) return undefined;
  const next: ConnectOptions = { ...options, url: node.webtransportUrl };
  if (options.certificateHashes && options.certificateHashes.length > 0) {
    if (!/^[0-9a-fA-F]{64}$/.test(node.certHash)) return undefined;
    next.certificateHashes = [node.certHash.toLowerCase()];
  }
  return next;
}

/**
 * Chooses a node of a cluster to connect to (from `Welcome.nodes` or a `Close`):
 * of two nodes taken at random among those not draining, the one with fewer
 * sessions (the power of two choices: close to the least loaded node without every
 * client rushing to the same one). Undefined when none is available. `random`
 * gives numbers in [0, 1).
 */
export function pickNode(
  nodes: readonly ClusterNode[],
  random: () => number = Math.random,
): ClusterNode | undefined {
  const live = nodes.filter((n) => !n.draining);
  const n = live.length;
  if (n <= 1) return live[0];
  const index = (below: number): number => Math.min(below - 1, Math.floor(random() * below));
  const a = index(n);
  const b = (a + 1 + index(n - 1)) % n;
  return live[b]!.sessions < live[a]!.sessions ? live[b] : live[a];
}

/**
 * The order in which to try the nodes of a cluster: `pickNode`'s choice first,
 * then the other nodes not draining, fewest sessions first. Nodes whose id is in
 * `last` (one just left, say) come after all others.
 */
export function failoverOrder(
  nodes: readonly ClusterNode[],
  random: () => number = Math.random,
  last: ReadonlySet<string> = new Set(),
): ClusterNode[] {
  const live = nodes.filter((n) => !n.draining);
  const preferred = live.filter((n) => !last.has(n.nodeId));
  const first = pickNode(preferred, random);
  const bySessions = (a: ClusterNode, b: ClusterNode): number =>
    a.sessions < b.sessions ? -1 : a.sessions > b.sessions ? 1 : 0;
  const rest = preferred.filter((n) => n !== first).sort(bySessions);
  const demoted = live.filter((n) => last.has(n.nodeId)).sort(bySessions);
  return [...(first ? [first] : []), ...rest, ...demoted];
}

export type RequestBody = MessageInitShape<typeof RequestSchema>["body"];
/** The names of the request bodies ("echo", "chatSend", "metricsSubscribe", ...). */
export type RequestCase = NonNullable<RequestBody>["case"] & string;
/** The answer body of a request case (a Response body of the same name). */
export type Answer<C extends RequestCase> = Extract<Response["body"], { case: C }>["value"];
export type PushListener = (push: Push, kind: StreamKind) => void;
export type MetricsListener = (update: MetricsUpdate) => void;
export type ErrorListener = (error: TuttiError) => void;
/** A datagram from the server (typing, cursors; pongs are handled by the client). */
export type DatagramListener = (datagram: Datagram) => void;
export type DatagramInit = MessageInitShape<typeof DatagramSchema>;

/** What to stream with `subscribeMetrics` (MetricsSubscribeRequest). */
export interface MetricsSubscription {
  /** Event types whose counts to stream; "*" for every type (default ["*"]). */
  eventTypes?: string[];
  /** Metric names or prefixes ("latency.*"), or "*" for all (default ["*"]). */
  metrics?: string[];
  /** Update interval in ms; 0 or absent: the server's default. */
  intervalMs?: number;
  /**
   * In a cluster, also stream every other node's metrics: each update names its
   * node in `nodeId` and numbers its `seq` per node (default false: this node's).
   */
  allNodes?: boolean;
}

/** Fetches `/cert-hash` from the server's HTTP port: the hashes to pin, newest first. */
export async function fetchCertificateHashes(
  baseUrl: string | URL,
  fetchImpl: typeof fetch = fetch,
): Promise<Uint8Array[]> {
  const res = await fetchImpl(new URL("/cert-hash", baseUrl));
  if (!res.ok) throw new Error(`GET /cert-hash: HTTP ${res.status}`);
  const body = (await res.json()) as { hashes?: Array<{ algorithm?: string; value?: string }> };
  return (body.hashes ?? [])
    .filter((h) => h.algorithm === "sha-256" && typeof h.value === "string")
    .map((h) => hexToBytes(h.value!));
}

/** Decodes a hex string ("ab01..." or "AB:01:..."). */
export function hexToBytes(hex: string): Uint8Array {
  const clean = hex.replace(/[^0-9a-fA-F]/g, "");
  if (clean.length % 2 !== 0) throw new Error(`odd-length hex string: ${hex}`);
  const out = new Uint8Array(clean.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(clean.slice(2 * i, 2 * i + 2), 16);
  return out;
}

interface Deferred<T> {
  promise: Promise<T>;
  resolve: (value: T) => void;
  reject: (reason: unknown) => void;
}

function deferred<T>(): Deferred<T> {
  let resolve!: (value: T) => void;
  let reject!: (reason: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function describe(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

function decode<Desc extends DescMessage>(schema: Desc, bytes: Uint8Array): MessageShape<Desc> {
  try {
    return fromBinary(schema, bytes);
  } catch (err) {
    throw TuttiError.local("PROTOCOL_ERROR", `undecodable ${schema.typeName}: ${describe(err)}`);
  }
}

/** How long to wait, after the session or the control stream ends, for the other. */
const CLOSE_GRACE_MS = 250;
/** Pushes kept while nobody listens yet. */
const MAX_UNHEARD_PUSHES = 1000;

interface PendingPing {
  resolve: (rttMs: number) => void;
  reject: (reason: unknown) => void;
  sentAt: number;
}

/** A session with a Tutti server. Create it with `TuttiClient.connect`. */
export class TuttiClient {
  /** The server's Welcome. */
  welcome!: Welcome;
  /** Settles (never rejects) when the session ends, with the reason. */
  readonly closed: Promise<TuttiError>;

  private readonly wt: WebTransportLike;
  private readonly decoder: FrameDecoder;
  private controlWriter?: WritableStreamDefaultWriter<Uint8Array>;
  private datagramWriter?: WritableStreamDefaultWriter<Uint8Array>;
  private readonly welcomed = deferred<Welcome>();
  private readonly closedDeferred = deferred<TuttiError>();
  private readonly controlDone = deferred<void>();
  private readonly sessionDone = deferred<void>();

  private nextRequestId = 1n;
  private nextNonce = 1n;
  private readonly pending = new Map<bigint, Deferred<Response>>();
  private readonly inflightWaiters: Array<() => void> = [];
  private maxInflight = Number.POSITIVE_INFINITY;
  private maxOutgoingFrame = Number.POSITIVE_INFINITY;
  private readonly datagramPings = new Map<bigint, PendingPing>();
  private readonly controlPings = new Map<bigint, PendingPing>();

  private readonly pushListeners = new Set<PushListener>();
  private readonly errorListeners = new Set<ErrorListener>();
  private readonly datagramListeners = new Set<DatagramListener>();
  private readonly drainingListeners = new Set<() => void>();
  private drained = false;
  private unheard: Array<[Push, StreamKind]> = [];

  private frameReason?: TuttiError;
  private sessionReason?: TuttiError;
  private terminating = false;
  private reason?: TuttiError;
  private heartbeat?: ReturnType<typeof setInterval>;
  private getToken?: () => string | Promise<string>;
  private refreshTimer?: ReturnType<typeof setTimeout>;
  /** Welcome's server time and `performance.now()` when it arrived (0: none yet). */
  private serverTimeAtWelcome = 0;
  private welcomeAt = 0;
  /**
   * The server's clock now, in ms since the epoch: Welcome's time plus the
   * monotonic time since it arrived (so a change of the device's clock during
   * the session does not move it); the device's clock before a Welcome with one.
   */
  serverNow(): number {
    if (this.serverTimeAtWelcome === 0) return Date.now();
    return this.serverTimeAtWelcome + (performance.now() - this.welcomeAt);
  }
  /** When the session's token expires, server time in ms since the epoch (0: unknown). */
  tokenExpiresAtMs = 0;
  private lastSentAt = 0;

  private constructor(wt: WebTransportLike, maxFrameSize: number) {
    this.wt = wt;
    this.decoder = new FrameDecoder(maxFrameSize);
    this.closed = this.closedDeferred.promise;
    // Nobody may be waiting on Welcome when the session fails: no unhandled rejection.
    this.welcomed.promise.catch(() => {});
    wt.draining?.then(
      () => {
        if (this.reason) return;
        this.drained = true;
        for (const listener of this.drainingListeners) listener();
      },
      () => {},
    );
    wt.closed.then(
      (info) => {
        const code = info?.closeCode ?? 0;
        const reason = info?.reason ?? "";
        this.sessionReason = new TuttiError(
          code,
          closeCodeName(code),
          reason || (this.welcome ? "session closed" : "session closed before Welcome"),
        );
        this.sessionDone.resolve();
        this.terminate();
      },
      (err: unknown) => {
        this.sessionReason = TuttiError.local(
          this.welcome ? "CONNECTION_LOST" : "CONNECT_FAILED",
          describe(err),
          true,
        );
        this.sessionDone.resolve();
        this.terminate();
      },
    );
  }

  /**
   * Opens a session: connects, sends Hello and resolves on Welcome. A REDIRECT is
   * followed once (see `ConnectOptions.followRedirect`).
   */
  static async connect(options: ConnectOptions): Promise<TuttiClient> {
    try {
      return await TuttiClient.connectOnce(options);
    } catch (err) {
      if (!(err instanceof TuttiError) || err.source !== "server" || err.code !== REDIRECT) throw err;
      if (options.followRedirect === false) throw err;
      const first = err.nodes[0];
      const next = first && optionsForNode(options, first);
      if (!next) throw err;
      return TuttiClient.connectOnce({ ...next, followRedirect: false });
    }
  }

  /** One session attempt at `options.url`, without following a REDIRECT. */
  private static async connectOnce(options: ConnectOptions): Promise<TuttiClient> {
    const factory: WebTransportFactory =
      options.transport ?? ((url, opts) => new WebTransport(url, opts) as WebTransportLike);
    const wtOptions: WebTransportOptions = {};
    if (options.certificateHashes && options.certificateHashes.length > 0) {
      wtOptions.serverCertificateHashes = options.certificateHashes.map((h) => ({
        algorithm: "sha-256",
        value: (typeof h === "string" ? hexToBytes(h) : h) as Uint8Array<ArrayBuffer>,
      }));
    }
    let wt: WebTransportLike;
    try {
      wt = factory(options.url, wtOptions);
    } catch (err) {
      throw TuttiError.local("CONNECT_FAILED", describe(err));
    }
    const client = new TuttiClient(wt, options.maxFrameSize ?? DEFAULT_MAX_FRAME_SIZE);
    client.getToken = options.getToken;
    const timeoutMs = options.handshakeTimeoutMs ?? 10_000;
    const timer = setTimeout(
      () => client.shutdown(TuttiError.local("TIMEOUT", `no Welcome within ${timeoutMs} ms`, true)),
      timeoutMs,
    );
    try {
      await client.handshake(options);
      return client;
    } catch (err) {
      const reason =
        err instanceof TuttiError ? err : TuttiError.local("CONNECT_FAILED", describe(err), true);
      client.shutdown(reason);
      // The first reason wins (a Close frame, say, over the error it caused here).
      throw await client.closed;
    } finally {
      clearTimeout(timer);
    }
  }

  private async handshake(options: ConnectOptions): Promise<void> {
    await Promise.race([this.wt.ready, this.welcomed.promise]);
    const stream = await this.wt.createBidirectionalStream();
    this.controlWriter = stream.writable.getWriter();
    void this.readControl(stream.readable);
    void this.readPushStreams();
    void this.readDatagrams();
    const hello = create(ClientFrameSchema, {
      kind: {
        case: "hello",
        value: {
          token: options.token,
          client: { name: "tutti-web", version: CLIENT_VERSION, transport: "webtransport" },
          resume: { ...(options.resume ?? {}) },
          protocolVersion: PROTOCOL_VERSION,
        },
      },
    });
    await this.send(toBinary(ClientFrameSchema, hello));
    await this.welcomed.promise;
  }

  /** Adopts the limits and heartbeat announced in Welcome. */
  private applyWelcome(welcome: Welcome): void {
    this.welcome = welcome;
    const limits = welcome.limits;
    if (limits?.maxFrameSize) {
      this.decoder.maxFrameSize = limits.maxFrameSize;
      this.maxOutgoingFrame = limits.maxFrameSize;
    }
    if (limits?.maxInflightRequests) this.maxInflight = limits.maxInflightRequests;
    if (welcome.serverTimeMs > 0n) {
      this.serverTimeAtWelcome = Number(welcome.serverTimeMs);
      this.welcomeAt = performance.now();
    }
    this.tokenExpiresAtMs = Number(welcome.tokenExpiresAtMs);
    this.scheduleRefresh();
    if (welcome.heartbeatIntervalMs > 0) {
      const every = welcome.heartbeatIntervalMs;
      this.heartbeat = setInterval(() => {
        if (performance.now() - this.lastSentAt >= every * 0.9) this.sendControlPing(this.nonce());
      }, every);
    }
  }

  /** The authenticated user id (from Welcome). */
  get userId(): string {
    return this.welcome.userId;
  }

  /** Whether the session is still open. */
  get isOpen(): boolean {
    return this.reason === undefined;
  }

  /**
   * Sends a request and resolves with its Response. A Response carrying an error
   * rejects with a TuttiError. Requests are pipelined; beyond the server's
   * `max_inflight_requests` they wait for a slot.
   */
  async request(body: RequestBody): Promise<Response> {
    this.throwIfClosed();
    while (this.pending.size >= this.maxInflight) {
      await new Promise<void>((resolve) => this.inflightWaiters.push(resolve));
      this.throwIfClosed();
    }
    const id = this.nextRequestId++;
    const frame = create(ClientFrameSchema, {
      kind: { case: "request", value: create(RequestSchema, { id, body }) },
    });
    const bytes = toBinary(ClientFrameSchema, frame);
    if (bytes.length > this.maxOutgoingFrame) {
      throw TuttiError.local(
        "FRAME_TOO_LARGE",
        `request of ${bytes.length} bytes exceeds the server's limit of ${this.maxOutgoingFrame}`,
      );
    }
    const waiter = deferred<Response>();
    this.pending.set(id, waiter);
    this.send(bytes).catch((err: unknown) => this.settle(id)?.reject(err));
    const response = await waiter.promise;
    if (response.body.case === "error") {
      const e = response.body.value;
      throw new TuttiError(e.code, e.name || errorCodeName(e.code), e.message);
    }
    return response;
  }

  /**
   * Sends a request and resolves with the body of its answer, checked to be the
   * answer of the same kind: `await client.call({ case: "analyticsTop", value: {} })`
   * resolves with an AnalyticsTopResponse.
   */
  async call<C extends RequestCase>(body: Extract<RequestBody, { case: C }>): Promise<Answer<C>> {
    const wanted: string = (body as { case: C }).case;
    const response = await this.request(body);
    if (response.body.case !== wanted) {
      throw TuttiError.local(
        "PROTOCOL_ERROR",
        `${wanted} answered with ${response.body.case ?? "an empty response"}`,
      );
    }
    return response.body.value as Answer<C>;
  }

  /**
   * Subscribes this session to metrics updates (needs a token with the `metrics`
   * role; otherwise rejects with PERMISSION_DENIED). Updates arrive on the
   * analytics push stream: listen with `onMetrics`. A second call replaces the
   * subscription.
   */
  subscribeMetrics(subscription: MetricsSubscription = {}): Promise<MetricsSubscribeResponse> {
    return this.call({
      case: "metricsSubscribe",
      value: {
        eventTypes: subscription.eventTypes ?? ["*"],
        metrics: subscription.metrics ?? ["*"],
        intervalMs: subscription.intervalMs ?? 0,
        allNodes: subscription.allNodes ?? false,
      },
    });
  }

  /** Ends the metrics subscription. */
  async unsubscribeMetrics(): Promise<void> {
    await this.call({ case: "metricsUnsubscribe", value: {} });
  }

  /**
   * Records analytics events for this session's user; resolves with the number of
   * occurrences the server counted.
   */
  async track(
    events: ReadonlyArray<{ type: string; count?: number; dimensions?: Record<string, string> }>,
  ): Promise<bigint> {
    const answer = await this.call({
      case: "analyticsTrack",
      value: {
        events: events.map((e) => ({ type: e.type, count: e.count ?? 0, dimensions: e.dimensions ?? {} })),
      },
    });
    return answer.accepted;
  }

  /**
   * Replaces the session's token with `token` (same user and roles, a later
   * expiry); resolves with the new expiry in ms since the epoch. A refused token
   * rejects (PERMISSION_DENIED, BAD_REQUEST) and the session keeps its old one.
   */
  async refreshToken(token: string): Promise<number> {
    const answer = await this.call({ case: "authRefresh", value: { token } });
    this.tokenExpiresAtMs = Number(answer.tokenExpiresAtMs);
    this.scheduleRefresh();
    return this.tokenExpiresAtMs;
  }

  /**
   * With `getToken`, asks for a new token a minute before expiry (or halfway, for
   * short tokens). A failed attempt is retried once, halfway to expiry; after that
   * the server ends the session with TOKEN_EXPIRED.
   */
  private scheduleRefresh(retry = false): void {
    if (this.refreshTimer !== undefined) clearTimeout(this.refreshTimer);
    this.refreshTimer = undefined;
    const getToken = this.getToken;
    if (!getToken || this.tokenExpiresAtMs <= 0 || this.reason) return;
    const left = this.tokenExpiresAtMs - this.serverNow();
    const delay = retry ? left / 2 : left - Math.min(60_000, left / 2);
    if (left <= 1_000) return;
    this.refreshTimer = setTimeout(() => {
      Promise.resolve()
        .then(getToken)
        .then((token) => this.refreshToken(token))
        .catch(() => {
          if (!retry) this.scheduleRefresh(true);
        });
    }, Math.max(0, delay));
  }

  /** Diagnostics: the server returns `payload` (and pushes it too if `push`). */
  async echo(payload: Uint8Array | string, push = false): Promise<EchoResponse> {
    const bytes = typeof payload === "string" ? new TextEncoder().encode(payload) : payload;
    const response = await this.request({ case: "echo", value: { payload: bytes, push } });
    if (response.body.case !== "echo") {
      throw TuttiError.local("PROTOCOL_ERROR", `echo answered with ${response.body.case}`);
    }
    return response.body.value;
  }

  /**
   * Calls `listener` for every Push of every server push stream, with the stream's
   * kind. Pushes that arrived before the first listener are delivered to it.
   * Returns a function that removes the listener.
   */
  onPush(listener: PushListener): () => void {
    this.pushListeners.add(listener);
    const backlog = this.unheard;
    this.unheard = [];
    for (const [push, kind] of backlog) this.emitPush(push, kind);
    return () => this.pushListeners.delete(listener);
  }

  /**
   * Calls `listener` for every MetricsUpdate pushed for this session's metrics
   * subscription (see `subscribeMetrics`). Returns a function that removes it.
   */
  onMetrics(listener: MetricsListener): () => void {
    return this.onPush((push) => {
      if (push.event.case === "metricsUpdate") listener(push.event.value);
    });
  }

  /**
   * Calls `listener` when the server asks this session to drain
   * (`WebTransport.draining`): reconnect soon, the session will be closed.
   */
  onDraining(listener: () => void): () => void {
    this.drainingListeners.add(listener);
    if (this.drained) listener();
    return () => this.drainingListeners.delete(listener);
  }

  /** Calls `listener` for every datagram from the server except pongs (typing, cursors). */
  onDatagram(listener: DatagramListener): () => void {
    this.datagramListeners.add(listener);
    return () => this.datagramListeners.delete(listener);
  }

  /**
   * Sends one datagram (best effort: it may be lost). Resolves when it is handed to
   * the transport; rejects with CONNECTION_LOST when the session is gone.
   */
  async sendDatagram(datagram: DatagramInit): Promise<void> {
    this.throwIfClosed();
    const bytes = toBinary(DatagramSchema, create(DatagramSchema, datagram));
    try {
      await this.datagramWriterFor().write(bytes);
    } catch (err) {
      throw TuttiError.local("CONNECTION_LOST", `datagram not sent: ${describe(err)}`, true);
    }
  }

  /** Calls `listener` for server Error frames that belong to no request. */
  onError(listener: ErrorListener): () => void {
    this.errorListeners.add(listener);
    return () => this.errorListeners.delete(listener);
  }

  /**
   * Measures the round trip of a datagram ping, in milliseconds. Datagrams may be
   * lost: each attempt waits `timeoutMs`, then the next one is sent.
   */
  async pingDatagram(options: { timeoutMs?: number; attempts?: number } = {}): Promise<number> {
    const timeoutMs = options.timeoutMs ?? 1000;
    const attempts = Math.max(1, options.attempts ?? 3);
    for (let attempt = 0; attempt < attempts; attempt++) {
      this.throwIfClosed();
      const nonce = this.nonce();
      const waiter = this.expectPong(this.datagramPings, nonce, timeoutMs);
      waiter.catch(() => {}); // awaited below, unless the write fails first
      const sentAtUs = BigInt(Math.round((performance.timeOrigin + performance.now()) * 1000));
      const bytes = toBinary(
        DatagramSchema,
        create(DatagramSchema, { kind: { case: "ping", value: { nonce, sentAtUs } } }),
      );
      try {
        await this.datagramWriterFor().write(bytes);
      } catch (err) {
        this.datagramPings.delete(nonce);
        throw TuttiError.local("CONNECTION_LOST", `datagram not sent: ${describe(err)}`, true);
      }
      const rtt = await waiter;
      if (rtt !== undefined) return rtt;
    }
    throw TuttiError.local("TIMEOUT", `no datagram pong after ${attempts} attempts`, true);
  }

  /** Measures the round trip of a Ping on the control stream, in milliseconds. */
  async ping(timeoutMs = 5000): Promise<number> {
    this.throwIfClosed();
    const nonce = this.nonce();
    const waiter = this.expectPong(this.controlPings, nonce, timeoutMs);
    this.sendControlPing(nonce);
    const rtt = await waiter;
    if (rtt === undefined) throw TuttiError.local("TIMEOUT", `no pong within ${timeoutMs} ms`, true);
    return rtt;
  }

  /** Closes the session. Pending requests reject with a "CLOSED" TuttiError. */
  close(reason = "client closed"): void {
    this.shutdown(new TuttiError(0, "NORMAL", reason, "client"));
  }

  // ---------------------------------------------------------------- internals

  private nonce(): bigint {
    return this.nextNonce++;
  }

  private throwIfClosed(): void {
    if (this.reason) throw this.reason;
  }

  /** Resolves with the round trip, or undefined after `timeoutMs`. */
  private expectPong(
    table: Map<bigint, PendingPing>,
    nonce: bigint,
    timeoutMs: number,
  ): Promise<number | undefined> {
    return new Promise<number | undefined>((resolve, reject) => {
      const timer = setTimeout(() => {
        table.delete(nonce);
        resolve(undefined);
      }, timeoutMs);
      table.set(nonce, {
        sentAt: performance.now(),
        resolve: (rtt) => {
          clearTimeout(timer);
          resolve(rtt);
        },
        reject: (err) => {
          clearTimeout(timer);
          reject(err);
        },
      });
    });
  }

  private answerPong(table: Map<bigint, PendingPing>, nonce: bigint): void {
    const ping = table.get(nonce);
    if (!ping) return; // a heartbeat, a duplicate, or too late
    table.delete(nonce);
    ping.resolve(performance.now() - ping.sentAt);
  }

  private sendControlPing(nonce: bigint): void {
    const frame = create(ClientFrameSchema, { kind: { case: "ping", value: { nonce } } });
    this.send(toBinary(ClientFrameSchema, frame)).catch(() => {});
  }

  private async send(body: Uint8Array): Promise<void> {
    if (!this.controlWriter) throw TuttiError.local("CLOSED", "control stream not open");
    this.lastSentAt = performance.now();
    await this.controlWriter.write(encodeFrame(body));
  }

  private datagramWriterFor(): WritableStreamDefaultWriter<Uint8Array> {
    if (!this.datagramWriter) {
      const d = this.wt.datagrams;
      const writable = d.createWritable ? d.createWritable() : d.writable;
      if (!writable) throw TuttiError.local("UNSUPPORTED", "this WebTransport has no datagrams");
      this.datagramWriter = writable.getWriter();
    }
    return this.datagramWriter;
  }

  private settle(id: bigint): Deferred<Response> | undefined {
    const waiter = this.pending.get(id);
    if (!waiter) return undefined;
    this.pending.delete(id);
    this.inflightWaiters.shift()?.();
    return waiter;
  }

  private async readControl(readable: ReadableStream): Promise<void> {
    const reader = readable.getReader() as ReadableStreamDefaultReader<Uint8Array>;
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        for (const body of this.decoder.push(value)) {
          this.onServerFrame(decode(ServerFrameSchema, body));
          if (this.reason) return;
        }
      }
    } catch (err) {
      if (err instanceof TuttiError || err instanceof FrameError) {
        const reason =
          err instanceof TuttiError ? err : TuttiError.local("PROTOCOL_ERROR", err.message);
        this.shutdown(reason, 3503);
        return;
      }
      // The stream failed, most often because the session is closing.
    } finally {
      this.controlDone.resolve();
      reader.releaseLock();
    }
    this.terminate();
  }

  private onServerFrame(frame: ServerFrame): void {
    const kind = frame.kind;
    switch (kind.case) {
      case "welcome":
        if (this.welcome) {
          throw TuttiError.local("PROTOCOL_ERROR", "second Welcome");
        }
        this.applyWelcome(kind.value);
        this.welcomed.resolve(kind.value);
        break;
      case "response": {
        this.settle(kind.value.id)?.resolve(kind.value);
        break;
      }
      case "error": {
        const e = kind.value;
        const err = new TuttiError(e.code, e.name || errorCodeName(e.code), e.message);
        if (!this.welcome) {
          // Before Welcome the server answers Hello with an error, then closes.
          this.frameReason = err;
          this.shutdown(err);
        } else {
          for (const listener of this.errorListeners) listener(err);
        }
        break;
      }
      case "pong":
        this.answerPong(this.controlPings, kind.value.nonce);
        break;
      case "close": {
        const c = kind.value;
        const err = new TuttiError(c.code, c.name || closeCodeName(c.code), c.message, "server", undefined, {
          retryAfterMs: c.retryAfterMs,
          nodes: c.nodes,
        });
        this.frameReason = err;
        this.shutdown(err);
        break;
      }
      case undefined:
        break; // a frame kind newer than this client: ignore
    }
  }

  private async readPushStreams(): Promise<void> {
    const reader = this.wt.incomingUnidirectionalStreams.getReader();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        void this.readPushStream(value as ReadableStream);
      }
    } catch {
      // The session ended.
    }
  }

  private async readPushStream(readable: ReadableStream): Promise<void> {
    const reader = readable.getReader() as ReadableStreamDefaultReader<Uint8Array>;
    const decoder = new FrameDecoder(this.decoder.maxFrameSize);
    let kind: StreamKind | undefined;
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        decoder.maxFrameSize = this.decoder.maxFrameSize;
        for (const body of decoder.push(value)) {
          if (kind === undefined) {
            kind = decode(PushStreamHeaderSchema, body).kind;
          } else {
            this.emitPush(decode(PushSchema, body), kind);
          }
        }
      }
    } catch (err) {
      if (this.reason) return;
      if (err instanceof TuttiError || err instanceof FrameError) {
        const e = err instanceof TuttiError ? err : TuttiError.local("PROTOCOL_ERROR", err.message);
        for (const listener of this.errorListeners) listener(e);
        await reader.cancel().catch(() => {});
      }
    }
  }

  private emitPush(push: Push, kind: StreamKind): void {
    if (this.pushListeners.size === 0) {
      if (this.unheard.length < MAX_UNHEARD_PUSHES) this.unheard.push([push, kind]);
      return;
    }
    for (const listener of this.pushListeners) {
      try {
        listener(push, kind);
      } catch (err) {
        console.error("push listener failed", err);
      }
    }
  }

  private async readDatagrams(): Promise<void> {
    const reader = this.wt.datagrams.readable.getReader() as ReadableStreamDefaultReader<Uint8Array>;
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        let datagram;
        try {
          datagram = fromBinary(DatagramSchema, value);
        } catch {
          continue; // a datagram is best effort: drop what does not decode
        }
        if (datagram.kind.case === "pong") {
          this.answerPong(this.datagramPings, datagram.kind.value.nonce);
        } else {
          for (const listener of this.datagramListeners) {
            try {
              listener(datagram);
            } catch (err) {
              console.error("datagram listener failed", err);
            }
          }
        }
      }
    } catch {
      // The session ended.
    }
  }

  /**
   * The session or the control stream ended. Give the other a moment to end too, so
   * that a Close frame written just before the session closed is read, then shut
   * down with the most precise reason.
   */
  private async terminate(): Promise<void> {
    if (this.terminating || this.reason) return;
    this.terminating = true;
    await Promise.race([
      Promise.all([this.controlDone.promise, this.sessionDone.promise]),
      sleep(CLOSE_GRACE_MS),
    ]);
    this.shutdown(
      this.frameReason ??
        this.sessionReason ??
        TuttiError.local("CONNECTION_LOST", "the server closed the control stream", true),
    );
  }

  /** Ends the session once; the first reason is kept. */
  private shutdown(reason: TuttiError, closeCode = 0): void {
    if (this.reason) return;
    this.reason = reason;
    if (this.heartbeat !== undefined) clearInterval(this.heartbeat);
    if (this.refreshTimer !== undefined) clearTimeout(this.refreshTimer);
    const gone =
      reason.source === "client" && reason.name === "NORMAL"
        ? TuttiError.local("CLOSED", "the session is closed")
        : reason;
    this.welcomed.reject(reason);
    for (const waiter of this.pending.values()) waiter.reject(gone);
    this.pending.clear();
    for (const wake of this.inflightWaiters.splice(0)) wake();
    for (const table of [this.datagramPings, this.controlPings]) {
      for (const ping of table.values()) ping.reject(gone);
      table.clear();
    }
    try {
      this.wt.close({ closeCode, reason: reason.source === "client" ? reason.message : "" });
    } catch {
      // Already closed.
    }
    this.closedDeferred.resolve(reason);
  }
}
