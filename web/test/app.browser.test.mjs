// The app (/) end to end: the real `tutti serve` binary, the built app (web/dist)
// and headless Chromium, several browser contexts as several users, driven through
// the page like a user (forms, buttons, keyboard). Same prerequisites as
// test/browser.test.mjs (see tools/e2e.mjs). Screenshots go to test-results/.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { RESULTS, appHarness, missing, suiteOrSkip } from "../tools/e2e.mjs";

/** A message sent in one browser must show in the other's open room within this. */
const DELIVERY_BUDGET_MS = 2_000;
const WAIT_MS = 15_000;

suiteOrSkip("app end-to-end", missing(["index.html", "app.js", "app.css"]), suite);

function suite() {
  const apiKey = randomBytes(24).toString("hex");
  const h = appHarness("tutti-app-e2e-", { TUTTI_API_KEY: apiKey });
  before(h.start);
  after(h.stop);

  /** A new browser context signed in as `user` through the form; resolves when connected. */
  async function signIn(user, options = {}) {
    const s = await h.openSignedIn(user, options);
    await waitFor(s.page, s.logs, () => document.querySelector("#conn")?.dataset.state === "connected", null, `${user} connected`);
    return s;
  }

  /** Waits for `fn(arg)` in the page; on timeout fails with what the page shows. */
  async function waitFor(page, logs, fn, arg, what, timeout = WAIT_MS) {
    try {
      await page.waitForFunction(fn, arg, { timeout });
    } catch {
      const conn = await page.textContent("#conn").catch(() => "?");
      const err = await page.textContent("#app-error").catch(() => "?");
      assert.fail(`${what}: not within ${timeout} ms (conn: ${conn}; error: ${err})\nconsole:\n${logs.join("\n")}\n` +
        `server output:\n${h.server.output().slice(-3000)}`);
    }
  }

  const text = (page, sel) => page.textContent(sel).then((t) => (t ?? "").trim());
  const badge = (page, room) =>
    page.$eval(`#room-list li[data-room="${room}"] .room-unread`, (b) => (b.hidden ? "0" : b.textContent));
  const messages = (page) => page.$$eval("#messages .msg .msg-text", (ns) => ns.map((n) => n.textContent));

  async function createRoom(s, name, people) {
    await s.page.click("#tab-chats");
    await s.page.fill("#new-room-name", name);
    await s.page.fill("#new-room-people", people.join(", "));
    await s.page.click("#new-room-submit");
    await waitFor(s.page, s.logs, (n) => document.querySelector("#room-title")?.textContent === n, name, `room ${name} open`);
    return s.page.$eval("#room-list li[aria-current=true]", (li) => li.dataset.room);
  }

  /** Accepts the invitation into `roomId` shown in the list of invitations. */
  async function accept(s, roomId) {
    await s.page.click("#tab-chats");
    const item = `#invite-list li[data-room="${roomId}"]`;
    await waitFor(s.page, s.logs, (sel) => !!document.querySelector(sel), item, `invitation to ${roomId}`);
    await s.page.click(`${item} .invite-accept`);
    await waitFor(s.page, s.logs, (sel) => !document.querySelector(sel), item, `invitation to ${roomId} accepted`);
  }

  async function send(s, line) {
    await s.page.fill("#composer-input", line);
    await s.page.press("#composer-input", "Enter");
  }

  test("chat between two users: delivery, exact unread badges, read receipt, typing", async () => {
    const alice = await signIn("alice");
    const bob = await signIn("bob");
    const roomId = await createRoom(alice, "Team", ["bob"]);
    // Bob is invited: the room is his once he accepts.
    assert.equal(await bob.page.$(`#room-list li[data-room="${roomId}"]`), null);
    await accept(bob, roomId);

    // Bob sees the new room (room event push), with nothing unread.
    await waitFor(bob.page, bob.logs, (r) => !!document.querySelector(`#room-list li[data-room="${r}"]`), roomId, "room in bob's list");
    assert.equal(await badge(bob.page, roomId), "0");

    // Two messages while bob is elsewhere: his badge counts exactly 1, then 2.
    await send(alice, "hello bob");
    await waitFor(bob.page, bob.logs, (r) => document.querySelector(`#room-list li[data-room="${r}"] .room-unread`)?.textContent === "1", roomId, "badge 1");
    assert.match(await text(bob.page, `#room-list li[data-room="${roomId}"] .room-last`), /alice: hello bob/);
    await send(alice, "are you there? 🎉");
    await waitFor(bob.page, bob.logs, (r) => document.querySelector(`#room-list li[data-room="${r}"] .room-unread`)?.textContent === "2", roomId, "badge 2");
    assert.equal(await badge(alice.page, roomId), "0", "the sender has nothing unread");

    // Bob opens the room: both messages, badge back to 0, alice sees the receipt.
    await bob.page.click(`#room-list li[data-room="${roomId}"] button`);
    await waitFor(bob.page, bob.logs, () => document.querySelectorAll("#messages .msg").length === 2, null, "two messages");
    assert.deepEqual(await messages(bob.page), ["hello bob", "are you there? 🎉"]);
    await waitFor(bob.page, bob.logs, (r) => document.querySelector(`#room-list li[data-room="${r}"] .room-unread`)?.hidden === true, roomId, "badge cleared");
    await waitFor(alice.page, alice.logs, () => document.querySelector("#receipt")?.textContent === "Seen by bob", null, "read receipt");
    // The server agrees: bob's unread count for the room is 0.
    const unread = await bob.page.evaluate(async (r) => {
      const rooms = await window.tuttiApp.tutti.rooms();
      return String(rooms.find((s) => s.room.roomId === r).unread);
    }, roomId);
    assert.equal(unread, "0");

    // Live delivery into the open room, timed.
    const t0 = Date.now();
    await send(alice, "fast?");
    await waitFor(bob.page, bob.logs, () => [...document.querySelectorAll("#messages .msg-text")].some((n) => n.textContent === "fast?"), null, "live message", DELIVERY_BUDGET_MS);
    const deliveryMs = Date.now() - t0;
    console.log(`message shown in the other browser after ${deliveryMs} ms (budget ${DELIVERY_BUDGET_MS} ms)`);

    // Typing: bob types, alice sees it; bob clears the box, it goes away.
    await bob.page.focus("#composer-input");
    await bob.page.keyboard.type("I am wri");
    await waitFor(alice.page, alice.logs, () => document.querySelector("#typing")?.textContent === "bob is typing…", null, "typing shown");
    await bob.page.fill("#composer-input", "");
    await bob.page.dispatchEvent("#composer-input", "input");
    await waitFor(alice.page, alice.logs, () => document.querySelector("#typing")?.textContent === "", null, "typing cleared");

    // Bob answers: alice, in the room, reads it at once (no badge).
    await send(bob, "yes, here");
    await waitFor(alice.page, alice.logs, () => [...document.querySelectorAll("#messages .msg-text")].some((n) => n.textContent === "yes, here"), null, "answer");
    assert.equal(await badge(alice.page, roomId), "0");
    // Alice (admin) adds zoe: she is invited, and shows among the members as such.
    await alice.page.fill("#room-add-user", "zoe");
    await alice.page.click("#room-add-submit");
    await waitFor(alice.page, alice.logs, () => document.querySelector('#members li[data-user="zoe"]')?.dataset.invited === "true", null, "zoe invited");
    await waitFor(bob.page, bob.logs, () => document.querySelector('#members li[data-user="zoe"]')?.dataset.invited === "true", null, "bob sees zoe invited");
    await alice.page.screenshot({ path: join(RESULTS, "app-chat.png") });
    await alice.context.close();
    await bob.context.close();
  });

  test("history pages in as the list scrolls up (infinite scroll)", async () => {
    const carol = await signIn("carol");
    const roomId = await createRoom(carol, "Log", []);
    // 70 messages through the library (setup), then a fresh page reads them back.
    await carol.page.evaluate(async (r) => {
      for (let i = 1; i <= 70; i++) await window.tuttiApp.tutti.sendMessage(r, `line ${i}`);
    }, roomId);
    await carol.page.reload();
    await waitFor(carol.page, carol.logs, () => document.querySelector("#conn")?.dataset.state === "connected", null, "connected");
    await carol.page.click(`#room-list li[data-room="${roomId}"] button`);
    await waitFor(carol.page, carol.logs, () => document.querySelectorAll("#messages .msg").length === 30, null, "first page of 30");
    for (const want of [60, 70]) {
      await carol.page.$eval("#scroller", (s) => { s.scrollTop = 0; s.dispatchEvent(new Event("scroll")); });
      await waitFor(carol.page, carol.logs, (n) => document.querySelectorAll("#messages .msg").length === n, want, `${want} messages`);
    }
    const lines = await messages(carol.page);
    assert.deepEqual(lines, Array.from({ length: 70 }, (_, i) => `line ${i + 1}`), "all of them, in order, once");
    assert.equal(await text(carol.page, "#history-status"), "Start of the conversation");
    await carol.context.close();
  });

  test("notifications: live with the exact count, mark read, mark all, a second tab agrees", async () => {
    const dave = await signIn("dave");
    const tab2 = await dave.context.newPage();
    const tab2Logs = [];
    tab2.on("console", (m) => tab2Logs.push(`[${m.type()}] ${m.text()}`));
    await tab2.goto(dave.page.url()); // the same #token=
    await waitFor(tab2, tab2Logs, () => document.querySelector("#conn")?.dataset.state === "connected", null, "second tab");

    const notify = async (title) => {
      const res = await fetch(new URL("/api/v1/notifications", h.urls.page), {
        method: "POST",
        headers: { authorization: `Bearer ${apiKey}`, "content-type": "application/json" },
        body: JSON.stringify({ user_id: "dave", kind: "mention", title, body: "in #ops" }),
      });
      const body = await res.text();
      assert.equal(res.status, 201, body);
      return JSON.parse(body).notification_id;
    };
    const count = (page) => page.$eval("#bell-count", (b) => (b.hidden ? "0" : b.textContent));

    const first = await notify("Bob mentioned you");
    for (const [page, logs] of [[dave.page, dave.logs], [tab2, tab2Logs]]) {
      await waitFor(page, logs, () => document.querySelector("#bell-count")?.dataset.count === "1", null, "badge 1");
    }
    await notify("Deploy finished");
    await notify("Carol replied");
    for (const [page, logs] of [[dave.page, dave.logs], [tab2, tab2Logs]]) {
      await waitFor(page, logs, () => document.querySelector("#bell-count")?.dataset.count === "3", null, "badge 3");
    }
    await dave.page.click("#bell");
    assert.equal(await dave.page.$$eval("#notif-list .notif", (n) => n.length), 3);
    await dave.page.click(`#notif-list .notif[data-id="${first}"] .mark-read`);
    for (const [page, logs] of [[dave.page, dave.logs], [tab2, tab2Logs]]) {
      await waitFor(page, logs, () => document.querySelector("#bell-count")?.dataset.count === "2", null, "badge 2 after mark read");
    }
    assert.equal(await count(tab2), "2");
    await waitFor(tab2, tab2Logs, (id) => document.querySelector(`#notif-list .notif[data-id="${id}"]`)?.dataset.read === "true", first, "read in the other tab");
    await dave.page.screenshot({ path: join(RESULTS, "app-notifications.png") });
    await dave.page.click("#notif-mark-all");
    for (const [page, logs] of [[dave.page, dave.logs], [tab2, tab2Logs]]) {
      await waitFor(page, logs, () => document.querySelector("#bell-count")?.hidden === true, null, "badge cleared");
    }
    assert.equal(await count(dave.page), "0");
    await dave.context.close();
  });

  test("presence: the other user's dot goes online, away, and offline after the tab closes", async () => {
    const erin = await signIn("erin");
    const frank = await signIn("frank");
    const pair = await createRoom(erin, "Pair", ["frank"]);
    await accept(frank, pair);
    const dot = (page, who) => `#members li[data-user="${who}"] .dot`;
    const statusIs = ([sel, want]) => document.querySelector(sel)?.dataset.status === want;
    await waitFor(erin.page, erin.logs, statusIs, [dot(erin.page, "frank"), "online"], "frank online");

    await frank.page.selectOption("#status-select", "away");
    await waitFor(erin.page, erin.logs, statusIs, [dot(erin.page, "frank"), "away"], "frank away");
    await frank.page.selectOption("#status-select", "online");
    await waitFor(erin.page, erin.logs, statusIs, [dot(erin.page, "frank"), "online"], "frank online again");

    const closedAt = Date.now();
    await frank.page.close({ runBeforeUnload: true }); // as a user closes the tab
    await frank.context.close();
    // Offline only after the grace period (presence.grace, 5 s by default).
    await waitFor(erin.page, erin.logs, statusIs, [dot(erin.page, "frank"), "offline"], "frank offline", 20_000);
    const after = Date.now() - closedAt;
    assert.ok(after >= 4_900, `offline after ${after} ms, not before the 5 s grace period`);
    console.log(`offline shown ${after} ms after the tab closed (grace 5 s)`);
    await erin.context.close();
  });

  test("contacts: request, accept, presence, remove", async () => {
    const gina = await signIn("gina");
    const hank = await signIn("hank");
    await gina.page.click("#tab-people");
    await gina.page.fill("#contact-user", "hank");
    await gina.page.click("#contact-submit");
    await waitFor(gina.page, gina.logs, () => document.querySelector('#contact-list li[data-user="hank"]')?.dataset.state === "REQUESTED", null, "requested");
    await hank.page.click("#tab-people");
    await waitFor(hank.page, hank.logs, () => !!document.querySelector('#contact-list li[data-user="gina"] .accept'), null, "incoming request");
    await hank.page.click('#contact-list li[data-user="gina"] .accept');
    await waitFor(gina.page, gina.logs, () => document.querySelector('#contact-list li[data-user="hank"]')?.dataset.state === "ACCEPTED", null, "accepted");
    await waitFor(gina.page, gina.logs, () => document.querySelector('#contact-list li[data-user="hank"] .dot')?.dataset.status === "online", null, "hank online");
    await hank.page.selectOption("#status-select", "dnd");
    await waitFor(gina.page, gina.logs, () => document.querySelector('#contact-list li[data-user="hank"] .dot')?.dataset.status === "dnd", null, "hank dnd");
    await gina.page.click('#contact-list li[data-user="hank"] .remove');
    await waitFor(gina.page, gina.logs, () => !document.querySelector('#contact-list li[data-user="hank"]'), null, "removed");
    await waitFor(hank.page, hank.logs, () => !document.querySelector('#contact-list li[data-user="gina"]'), null, "removed on the other side");
    await gina.context.close();
    await hank.context.close();
  });

  test("narrow screen in dark mode: one column, keyboard only, every control labelled", async () => {
    const ivan = await signIn("ivan", { viewport: { width: 390, height: 780 }, colorScheme: "dark" });
    const { page } = ivan;
    // Every control has an accessible name (label, aria-label or text).
    const unnamed = await page.evaluate(() => [...document.querySelectorAll("input, select, button, textarea")]
      .filter((e) => e.offsetParent !== null || e.closest("[hidden]") === null)
      .filter((e) => !(e.labels?.length || e.getAttribute("aria-label") || e.textContent.trim()))
      .map((e) => e.id || e.outerHTML.slice(0, 60)));
    assert.deepEqual(unnamed, []);
    assert.equal(await page.evaluate(() => getComputedStyle(document.body).backgroundColor), "rgb(18, 21, 27)", "dark colours");

    // Keyboard only: tab to the room form, create a room, send a message.
    await page.focus("#new-room-name");
    await page.keyboard.type("Solo");
    await page.keyboard.press("Enter");
    await waitFor(page, ivan.logs, () => document.querySelector("#room-title")?.textContent === "Solo", null, "room open");
    // One column: the list is hidden while the room shows, with a back button.
    assert.equal(await page.isVisible(".side"), false);
    assert.equal(await page.isVisible("#back"), true);
    await page.keyboard.type("typed with the keyboard");
    await page.keyboard.press("Enter");
    await waitFor(page, ivan.logs, () => document.querySelector("#messages .msg-text")?.textContent === "typed with the keyboard", null, "sent");
    await page.screenshot({ path: join(RESULTS, "app-narrow-dark.png") });
    await page.focus("#back");
    await page.keyboard.press("Enter");
    assert.equal(await page.isVisible(".side"), true);
    assert.equal(await page.isVisible("#room-view"), false);
    await ivan.context.close();
  });
}
