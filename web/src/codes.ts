// Stable numeric codes of the Tutti protocol. The server defines them in
// src/protocol/codes.rs; test/codes.test.mjs pins this table to that file. Used to
// name a close code when the session ends before the server's Close frame could be
// read (the code then only arrives as the session close code).

/** Errors answered to a request or to a frame; the session stays open. */
export const ERROR_CODES: Readonly<Record<number, string>> = {
  100: "INTERNAL",
  101: "BAD_REQUEST",
  102: "UNKNOWN_REQUEST",
  103: "PERMISSION_DENIED",
  104: "NOT_FOUND",
  105: "LIMIT_EXCEEDED",
  106: "RATE_LIMITED",
  107: "CONFLICT",
  108: "RESYNC_REQUIRED",
  109: "INVALID_OPERATION",
  110: "UNKNOWN_EVENT_TYPE",
  111: "UNAVAILABLE",
  112: "RESPONSE_TOO_LARGE",
  200: "FRAME_TOO_LARGE",
  201: "FRAME_MALFORMED",
  202: "UNEXPECTED_FRAME",
  203: "TOO_MANY_INFLIGHT",
  204: "BAD_REQUEST_ID",
};

/**
 * Why a session was closed. 3000-3499: reconnect with backoff; 3500-3999: do not
 * reconnect without a change (a new token, a fixed client).
 */
export const CLOSE_CODES: Readonly<Record<number, string>> = {
  0: "NORMAL",
  3000: "GOING_AWAY",
  3001: "SLOW_CONSUMER",
  3002: "SERVER_ERROR",
  3003: "HANDSHAKE_TIMEOUT",
  3004: "OVERLOADED",
  3005: "TOO_MANY_CONNECTIONS",
  3006: "STORAGE_UNAVAILABLE",
  3007: "REDIRECT",
  3500: "TOKEN_MISSING",
  3501: "UNAUTHORIZED",
  3502: "TOKEN_EXPIRED",
  3503: "PROTOCOL_ERROR",
  3504: "UNSUPPORTED_VERSION",
};

/** Whether a client should reconnect after a close with this code. */
export function shouldReconnect(closeCode: number): boolean {
  return closeCode >= 3000 && closeCode < 3500;
}

/** The name of a close code, or `CLOSE_<n>` for one this client does not know. */
export function closeCodeName(code: number): string {
  return CLOSE_CODES[code] ?? `CLOSE_${code}`;
}

/** The name of an error code, or `ERROR_<n>` for one this client does not know. */
export function errorCodeName(code: number): string {
  return ERROR_CODES[code] ?? `ERROR_${code}`;
}
