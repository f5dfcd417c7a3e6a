// The maas console. Pages are shells; this script loads each page's view from
// /ui/views/<page>, rendered by the server, with the API key as a Bearer header.
// The key lives in this tab's sessionStorage only: never in a URL, a cookie or localStorage.
"use strict";

const KEY = "maas.key";
const body = document.body;
const $ = (id) => document.getElementById(id);

function key() {
  return sessionStorage.getItem(KEY);
}

function authorized(init = {}) {
  const headers = new Headers(init.headers || {});
  headers.set("Authorization", `Bearer ${key()}`);
  return { ...init, headers };
}

// The API's error shapes: OpenAI's {"error": {"message"}} and v2's {"error": "..."}.
async function errorOf(response) {
  try {
    const data = await response.json();
    const error = data.error ?? data.detail ?? data;
    return typeof error === "string" ? error : error.message ?? JSON.stringify(error);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function showSignIn(message) {
  $("sign-in").hidden = false;
  $("view").replaceChildren();
  $("nav").replaceChildren();
  $("who").textContent = "";
  $("sign-out").hidden = true;
  const error = $("sign-in-error");
  error.hidden = !message;
  error.textContent = message || "";
  $("key").focus();
}

function signOut(message) {
  sessionStorage.removeItem(KEY);
  if (body.dataset.page !== "home") {
    window.location.assign("/ui");
    return;
  }
  showSignIn(message);
}

// Fetch a view; a 401 signs out (the key was revoked or expired), other errors show.
async function fetchView(path) {
  const response = await fetch(path, authorized({ cache: "no-store" }));
  if (response.status === 401) {
    sessionStorage.removeItem(KEY);
    showSignIn(await errorOf(response));
    return null;
  }
  if (!response.ok) {
    throw new Error(await errorOf(response));
  }
  return response.text();
}

async function loadNav() {
  const html = await fetchView("/ui/views/nav");
  if (html === null) return null;
  const nav = $("nav");
  nav.innerHTML = html;
  const who = $("who-name");
  $("who").replaceChildren(who);
  for (const link of nav.querySelectorAll("a[data-page]")) {
    if (link.dataset.page === body.dataset.page) link.setAttribute("aria-current", "page");
  }
  $("sign-out").hidden = false;
  $("sign-in").hidden = true;
  return [...nav.querySelectorAll("a[data-page]")].map((a) => a.dataset.page);
}

const charts = [];

function drawCharts(root) {
  for (const chart of charts.splice(0)) chart.destroy();
  for (const canvas of root.querySelectorAll("canvas[data-chart]")) {
    if (typeof Chart === "undefined") {
      const note = document.createElement("p");
      note.className = "muted";
      note.textContent = "Charts are off: the chart library is not installed (make install).";
      canvas.replaceWith(note);
      continue;
    }
    charts.push(new Chart(canvas, JSON.parse(canvas.dataset.chart)));
  }
}

let refreshTimer = null;
let refreshEvery = null;
let latest = 0;

async function loadView(query) {
  const page = body.dataset.page;
  const view = $("view");
  const mine = ++latest; // a slower, older answer never replaces a newer one
  clearTimeout(refreshTimer);
  let html;
  try {
    html = await fetchView(`/ui/views/${page}${query ? `?${query}` : ""}`);
  } catch (error) {
    if (mine !== latest) return;
    const message = document.createElement("p");
    message.className = "error";
    message.setAttribute("role", "alert");
    message.textContent = error.message;
    view.replaceChildren(message);
    if (refreshEvery) refreshTimer = setTimeout(() => loadView(query), refreshEvery); // retry
    return;
  }
  if (html === null || mine !== latest) return;
  view.innerHTML = html;
  drawCharts(view);
  wireFilters(view);
  wireChat(view);
  wireActions(view, query);
  wireTableFilters(view);
  const refreshing = view.querySelector("[data-refresh]");
  refreshEvery = refreshing ? Number(refreshing.dataset.refresh) : null;
  if (refreshEvery) refreshTimer = setTimeout(() => loadView(query), refreshEvery);
}

// A view's filter form reloads the view with its fields as the query (kept in the page's
// URL so it can be shared; the key never is).
function wireFilters(root) {
  for (const form of root.querySelectorAll("form[data-filters]")) {
    const reload = (event) => {
      event.preventDefault();
      const query = new URLSearchParams(new FormData(form)).toString();
      history.replaceState(null, "", `${location.pathname}?${query}`);
      loadView(query);
    };
    form.addEventListener("change", reload);
    form.addEventListener("submit", reload);
  }
}

// Forms and buttons that change something call the JSON API with the key, then reload the
// view; the API's message shows beside the form when it refuses.
function wireActions(root, query) {
  for (const form of root.querySelectorAll("form.api-form")) {
    const error = form.querySelector(".error");
    const submit = form.querySelector("button[type=submit]");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const body = {};
      for (const field of form.elements) {
        if (!field.name || field.value === "") continue;
        body[field.name] = "number" in field.dataset ? Number(field.value) : field.value;
      }
      submit.disabled = true; // one click, one key
      let made;
      try {
        const response = await fetch(form.dataset.api, authorized({
          method: form.dataset.method,
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify(body),
        }));
        if (!response.ok) throw new Error(await errorOf(response));
        made = await response.json();
      } catch (failure) {
        error.textContent = failure.message;
        error.hidden = false;
        submit.disabled = false;
        return;
      }
      if (made.key) showCreatedKey(made.key); // before anything else can fail
      await loadView(query);
    });
  }
  for (const button of root.querySelectorAll("button[data-revoke]")) {
    button.addEventListener("click", async () => {
      const id = button.dataset.revoke;
      if (!window.confirm(`Revoke key ${id} and every key made with it?`)) return;
      button.disabled = true;
      try {
        const response = await fetch(`/api/v1/keys/${encodeURIComponent(id)}`, authorized({
          method: "DELETE",
        }));
        if (!response.ok) throw new Error(await errorOf(response));
      } catch (failure) {
        window.alert(failure.message);
        button.disabled = false;
        return;
      }
      await loadView(query);
    });
  }
}

// A search box hides the rows of its table that do not contain what is typed.
function wireTableFilters(root) {
  for (const input of root.querySelectorAll("input[data-filter]")) {
    const rows = root.querySelectorAll(`#${input.dataset.filter} tbody tr`);
    input.addEventListener("input", () => {
      const wanted = input.value.trim().toLowerCase();
      for (const row of rows) row.hidden = !row.textContent.toLowerCase().includes(wanted);
    });
  }
}

// A new key is shown once, in the page only (never stored by the console).
function showCreatedKey(plaintext) {
  const box = $("created-key");
  if (!box) return;
  $("created-key-value").textContent = plaintext;
  box.hidden = false;
}

// The chat playground: streams /v1/chat/completions (server-sent events) into the log.
function wireChat(root) {
  const form = root.querySelector("form[data-chat]");
  if (!form) return;
  const messages = [];
  const log = $("chat-log");
  const input = $("chat-input");
  const error = $("chat-error");

  function say(role, text) {
    const item = document.createElement("li");
    item.className = role;
    const who = document.createElement("strong");
    who.textContent = `${role}: `;
    const content = document.createElement("span");
    content.className = "content";
    content.textContent = text;
    item.append(who, content);
    log.append(item);
    return content;
  }

  $("chat-clear").addEventListener("click", () => {
    messages.length = 0;
    log.replaceChildren();
    error.hidden = true;
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    error.hidden = true;
    messages.push({ role: "user", content: text });
    const asked = say("user", text).parentElement;
    let reader = null;
    input.value = "";
    const answer = say("assistant", "");
    answer.parentElement.dataset.streaming = "yes";
    const send = $("chat-send");
    send.disabled = true;
    try {
      const response = await fetch("/v1/chat/completions", authorized({
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({
          model: $("chat-model").value,
          messages,
          max_tokens: Number($("chat-max").value),
          temperature: Number($("chat-temperature").value),
          stream: true,
        }),
      }));
      if (!response.ok) throw new Error(await errorOf(response));
      reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      let finished = false;
      // Server-sent events: blank-line separated; only "data:" lines carry a chunk.
      const take = (event) => {
        for (const line of event.split(/\r?\n/)) {
          if (!line.startsWith("data:")) continue; // comments, event names, ids
          const data = line.slice(5).trim();
          if (data === "[DONE]") {
            finished = true;
            continue;
          }
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          const delta = chunk.choices?.[0]?.delta?.content;
          if (delta) answer.textContent += delta;
        }
      };
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        const events = buffer.split(/\r?\n\r?\n/);
        buffer = events.pop();
        events.forEach(take);
      }
      take(buffer);
      if (!finished) throw new Error("the answer stopped before its end (the connection closed)");
      messages.push({ role: "assistant", content: answer.textContent });
    } catch (failure) {
      messages.pop();
      asked.classList.add("not-sent");
      asked.title = "not in the conversation: the answer failed";
      if (!answer.textContent) answer.parentElement.remove();
      error.textContent = failure.message;
      error.hidden = false;
      reader?.cancel().catch(() => {}); // stop the generation on the server too
    } finally {
      delete answer.parentElement.dataset.streaming;
      answer.parentElement.dataset.done = "yes";
      send.disabled = false;
    }
  });
}

async function start() {
  $("sign-out").addEventListener("click", () => signOut());
  $("sign-in-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("key").value.trim());
    $("key").value = "";
    await open();
  });
  if (!key()) {
    showSignIn();
    return;
  }
  await open();
}

async function open() {
  let pages;
  try {
    pages = await loadNav();
  } catch (error) {
    showSignIn(error.message);
    return;
  }
  if (pages === null) return;
  if (body.dataset.page === "home") {
    if (pages.length) window.location.assign(`/ui/${pages[0]}`);
    return;
  }
  await loadView(location.search.slice(1));
}

start();
