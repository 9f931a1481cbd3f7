// The connection diagnostic page (/debug): gets a token (URL fragment
// `#token=...`, or the development endpoint), connects over WebTransport and shows
// the session.

import { TuttiClient, TuttiError, StreamKind, fetchCertificateHashes } from "./client";
import type { Push } from "./client";
import { devToken, serverInfo, webTransportUrl } from "./server-api";

type State = "idle" | "connecting" | "connected" | "closed" | "error";

const RTT_EVERY_MS = 5000;

function el<T extends HTMLElement = HTMLElement>(id: string): T {
  const found = document.getElementById(id);
  if (!found) throw new Error(`#${id} missing from the page`);
  return found as T;
}

const ui = {
  state: el("state"),
  user: el("user"),
  session: el("session"),
  node: el("node"),
  rtt: el("rtt"),
  error: el("error"),
  log: el("log"),
  login: el("login"),
  loginForm: el<HTMLFormElement>("login-form"),
  name: el<HTMLInputElement>("name"),
  loginSubmit: el<HTMLButtonElement>("login-submit"),
  echo: el<HTMLButtonElement>("echo"),
  disconnect: el<HTMLButtonElement>("disconnect"),
};

function setState(state: State): void {
  ui.state.textContent = state;
  ui.state.dataset["state"] = state;
  const live = state === "connected";
  ui.echo.disabled = !live;
  ui.disconnect.disabled = !live;
}

function showError(err: unknown): void {
  setState("error");
  ui.error.textContent =
    err instanceof TuttiError ? err.toString() : err instanceof Error ? err.message : String(err);
  log(`error: ${ui.error.textContent}`);
}

function log(line: string): void {
  const item = document.createElement("li");
  item.textContent = `${new Date().toLocaleTimeString()}  ${line}`;
  ui.log.prepend(item);
  while (ui.log.childElementCount > 200) ui.log.lastElementChild?.remove();
}

function tokenFromFragment(): string | null {
  const params = new URLSearchParams(location.hash.replace(/^#/, ""));
  const token = params.get("token");
  return token && token.trim() ? token.trim() : null;
}

/** The pins for a self-signed certificate; none when the server has a public one. */
async function certificateHashes(): Promise<Uint8Array[]> {
  try {
    return await fetchCertificateHashes(location.origin);
  } catch (err) {
    log(`no certificate pin (${err instanceof Error ? err.message : String(err)})`);
    return [];
  }
}

function devTokenFor(user: string): Promise<string> {
  return devToken(user, { noDevMode: "production server: pass #token=..." });
}

function describePush(push: Push, kind: StreamKind): string {
  const where = push.stream ? ` ${push.stream}@${push.offset}` : "";
  const kindName = StreamKind[kind] ?? String(kind);
  if (push.event.case === "echo") {
    return `push ${kindName}${where}: echo "${new TextDecoder().decode(push.event.value.payload)}"`;
  }
  return `push ${kindName}${where}: ${push.event.case ?? "unknown event"}`;
}

let current: TuttiClient | undefined;

async function connect(token: string): Promise<void> {
  setState("connecting");
  ui.error.textContent = "";
  const [info, hashes] = await Promise.all([serverInfo(), certificateHashes()]);
  const url = webTransportUrl(info);
  log(`connecting to ${url}`);
  const client = await TuttiClient.connect({ url, token, certificateHashes: hashes });
  current = client;
  (window as unknown as { tutti: unknown }).tutti = { client };

  const w = client.welcome;
  ui.user.textContent = w.userId;
  ui.session.textContent = w.sessionId;
  ui.node.textContent = w.nodeId;
  setState("connected");
  log(`welcome: user ${w.userId}, session ${w.sessionId}, node ${w.nodeId}`);

  client.onPush((push, kind) => log(describePush(push, kind)));
  client.onError((err) => log(`server error: ${err.toString()}`));
  void client.closed.then((reason) => {
    if (current === client) current = undefined;
    if (reason.source === "client" && reason.name === "NORMAL") {
      setState("closed");
      log("disconnected");
    } else {
      showError(reason);
    }
  });

  const measure = async (): Promise<void> => {
    if (!client.isOpen) return;
    try {
      const rtt = await client.pingDatagram();
      ui.rtt.textContent = `${rtt.toFixed(1)} ms`;
    } catch (err) {
      if (client.isOpen) ui.rtt.textContent = err instanceof Error ? err.message : String(err);
    }
  };
  await measure();
  const timer = setInterval(() => void measure(), RTT_EVERY_MS);
  void client.closed.then(() => clearInterval(timer));
}

function start(token: string): void {
  ui.login.hidden = true;
  connect(token).catch(showError);
}

ui.loginForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const name = ui.name.value.trim();
  if (!name) return;
  ui.loginSubmit.disabled = true;
  setState("connecting");
  devTokenFor(name)
    .then(start)
    .catch((err: unknown) => {
      ui.loginSubmit.disabled = false;
      showError(err);
    });
});

ui.echo.addEventListener("click", () => {
  const client = current;
  if (!client) return;
  const text = `hello from ${client.userId} at ${new Date().toISOString()}`;
  client
    .echo(text, true)
    .then((r) => log(`echo response: "${new TextDecoder().decode(r.payload)}"`))
    .catch((err: unknown) => log(`echo failed: ${err instanceof Error ? err.toString() : String(err)}`));
});

ui.disconnect.addEventListener("click", () => current?.close("disconnected by the user"));

window.addEventListener("hashchange", () => location.reload());

const token = tokenFromFragment();
if (token) {
  start(token);
} else {
  ui.login.hidden = false;
  ui.name.focus();
}
