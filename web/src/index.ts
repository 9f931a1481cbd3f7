// The Tutti client library: the public API of the package.
//
//   import { Tutti, fetchCertificateHashes } from "tutti-web";
//
// `Tutti` is the connection most applications want (reconnects, resumes, one typed
// promise per request, per-feature helpers); `TuttiClient` is one session, for tools
// that manage connections themselves.

export * from "./tutti";
export * from "./client";
export * from "./codes";
export { devToken, serverInfo, webTransportUrl } from "./server-api";
export type { ServerInfo } from "./server-api";
