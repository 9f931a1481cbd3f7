// The server's HTTP side used by the pages: /api/info, /api/dev/token, and the
// WebTransport URL to connect to.

export interface ServerInfo {
  webtransport: string;
  node_id?: string;
  dev_mode?: boolean;
}

export async function serverInfo(): Promise<ServerInfo> {
  const res = await fetch("/api/info", { headers: { accept: "application/json" } });
  if (!res.ok) throw new Error(`GET /api/info: HTTP ${res.status}`);
  const info = (await res.json()) as ServerInfo;
  if (typeof info.webtransport !== "string") throw new Error("GET /api/info: no webtransport URL");
  return info;
}

/** The WebTransport URL: the port from /api/info, the host this page came from. */
export function webTransportUrl(info: ServerInfo): string {
  const url = new URL(info.webtransport);
  // Chromium resolves "localhost" to ::1 only for QUIC: use the IPv4 literal.
  url.hostname = location.hostname === "localhost" ? "127.0.0.1" : location.hostname;
  return url.toString();
}

/** The body of an error answer, when it is short plain text. */
export async function shortText(res: Response): Promise<string> {
  const text = (await res.text().catch(() => "")).trim();
  return text.length <= 200 && !text.startsWith("<") ? text : res.statusText;
}

/**
 * A token without roles from a development server (`POST /api/dev/token`). A
 * production server has no such route: then this throws `new Error(noDevMode)`.
 */
export async function devToken(user: string, options: { noDevMode: string }): Promise<string> {
  const body = { user };
  const res = await fetch("/api/dev/token", {
    method: "POST",
    headers: { "content-type": "application/json", accept: "application/json" },
    body: JSON.stringify(body),
  });
  // No such route without development mode (404; 405 where only static files answer).
  if (res.status === 404 || res.status === 405) throw new Error(options.noDevMode);
  if (!res.ok) throw new Error(`POST /api/dev/token: HTTP ${res.status} ${await shortText(res)}`);
  const answer = (await res.json()) as { token?: string };
  if (!answer.token) throw new Error("POST /api/dev/token: no token in the answer");
  return answer.token;
}
