// The web chat page (/ui): a client of the OpenAI-compatible API, nothing more.
//
// Answers stream through fetch and a ReadableStream of server-sent events; Stop aborts the
// fetch, which closes the connection, and the server aborts the request. Images go as data
// URLs in an `image_url` content part. The conversation lives in this page only.
"use strict";

const API_KEY_STORAGE = "vlmserve.apiKey";
const $ = (id) => document.getElementById(id);

const ui = {
  model: $("model"),
  temperature: $("temperature"),
  maxTokens: $("max-tokens"),
  apiKey: $("api-key"),
  newChat: $("new-chat"),
  conversation: $("conversation"),
  emptyNote: $("empty-note"),
  error: $("error"),
  composer: $("composer"),
  message: $("message"),
  image: $("image"),
  attachment: $("attachment"),
  preview: $("attachment-preview"),
  attachmentName: $("attachment-name"),
  removeImage: $("remove-image"),
  status: $("status"),
  stop: $("stop"),
  send: $("send"),
};

const chat = {
  history: [], // OpenAI messages of the turns that succeeded (or were stopped)
  image: null, // {url, name}: attached to the next message
  controller: null, // the AbortController of the answer streaming now
};

// ---- API --------------------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = ui.apiKey.value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// "HTTP 400: <the server's message>" from an error response in OpenAI's shape (or not).
async function errorText(resp) {
  const body = await resp.text();
  let message = body.slice(0, 300) || resp.statusText;
  try {
    const parsed = JSON.parse(body);
    if (parsed && parsed.error) message = parsed.error.message || String(parsed.error);
  } catch (_) {
    // not JSON: keep the text
  }
  return `HTTP ${resp.status}: ${message}`;
}

// The JSON payloads of a text/event-stream body, up to `data: [DONE]`. An error event
// (`data: {"error": ...}`) throws with the server's message.
async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let data = [];
  const dispatch = () => {
    const text = data.join("\n");
    data = [];
    if (text.trim() === "[DONE]") return { done: true };
    const payload = JSON.parse(text);
    if (payload && payload.error) {
      throw new Error(`error during the answer: ${payload.error.message || payload.error}`);
    }
    return { payload };
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = lines.pop(); // an unfinished line waits for the next chunk
      for (const line of lines) {
        if (line === "") {
          if (data.length === 0) continue;
          const event = dispatch();
          if (event.done) return;
          yield event.payload;
        } else if (line.startsWith("data:")) {
          data.push(line.slice(5).replace(/^ /, ""));
        } // comments and other fields are ignored
      }
    }
    if (buffer.startsWith("data:")) data.push(buffer.slice(5).replace(/^ /, ""));
    if (data.length) {
      const event = dispatch();
      if (event.done) return;
      yield event.payload;
    }
    throw new Error("the answer ended before the server finished it (connection lost?)");
  } finally {
    reader.releaseLock();
  }
}

async function loadModels() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (!resp.ok) {
      const hint = resp.status === 401 ? " Enter the server's API key above." : "";
      showError(`Could not list the models: ${await errorText(resp)}${hint}`);
      return;
    }
    const { data } = await resp.json();
    const chosen = ui.model.value;
    ui.model.replaceChildren(
      ...data.map((m) => new Option(m.id, m.id, false, m.id === chosen)),
    );
    clearError();
  } catch (err) {
    showError(`Could not reach the server: ${err.message}`);
  }
}

// ---- the page -------------------------------------------------------------------------

function showError(text) {
  ui.error.textContent = text;
  ui.error.hidden = false;
}

function clearError() {
  ui.error.textContent = "";
  ui.error.hidden = true;
}

function addMessage(role, text, imageUrl) {
  ui.emptyNote.hidden = true;
  const article = document.createElement("article");
  article.className = `message ${role}`;
  const who = document.createElement("h2");
  who.textContent = role === "user" ? "You" : "Assistant";
  article.append(who);
  if (imageUrl) {
    const img = document.createElement("img");
    img.src = imageUrl;
    img.alt = "Image you attached";
    article.append(img);
  }
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  article.append(content);
  ui.conversation.append(article);
  article.scrollIntoView({ block: "end" });
  return article;
}

function setNote(article, text) {
  let note = article.querySelector(".note");
  if (!note) {
    note = document.createElement("p");
    note.className = "note";
    article.append(note);
  }
  note.textContent = text;
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
  ui.status.textContent = busy ? "Generating…" : "";
}

function attachImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    showError(`${file.name} is not an image.`);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    chat.image = { url: reader.result, name: file.name || "pasted image" };
    ui.preview.src = chat.image.url;
    ui.preview.alt = `Attached: ${chat.image.name}`;
    ui.attachmentName.textContent = chat.image.name;
    ui.attachment.hidden = false;
  };
  reader.onerror = () => showError(`Could not read ${file.name}.`);
  reader.readAsDataURL(file);
}

function detachImage() {
  chat.image = null;
  ui.image.value = "";
  ui.preview.removeAttribute("src");
  ui.attachment.hidden = true;
}

function numberOrNull(input) {
  const value = input.value.trim();
  return value === "" ? null : Number(value);
}

async function send(event) {
  event.preventDefault();
  const text = ui.message.value.trim();
  if (chat.controller || (!text && !chat.image)) return;
  clearError();

  const image = chat.image;
  const content = image
    ? [{ type: "text", text }, { type: "image_url", image_url: { url: image.url } }]
    : text;
  const turn = { role: "user", content };
  const body = {
    messages: [...chat.history, turn],
    stream: true,
    stream_options: { include_usage: true },
  };
  if (ui.model.value) body.model = ui.model.value;
  const temperature = numberOrNull(ui.temperature);
  if (temperature !== null) body.temperature = temperature;
  const maxTokens = numberOrNull(ui.maxTokens);
  if (maxTokens !== null) body.max_tokens = maxTokens;

  const asked = addMessage("user", text, image && image.url);
  ui.message.value = "";
  detachImage();
  const answer = addMessage("assistant", "");
  const answerText = answer.querySelector(".content");
  answer.dataset.state = "streaming";
  answer.setAttribute("aria-busy", "true");
  const controller = new AbortController();
  chat.controller = controller;
  setBusy(true);

  let reply = "";
  let finish = null;
  let usage = null;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    for await (const chunk of sseEvents(resp.body)) {
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const piece = (choice.delta && choice.delta.content) || "";
        if (piece) {
          reply += piece;
          answerText.textContent = reply;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    chat.history.push(turn, { role: "assistant", content: reply });
    answer.dataset.state = "done";
    answer.dataset.finish = finish || "";
    const counted = usage ? `, ${usage.completion_tokens} tokens` : "";
    setNote(answer, `finished: ${finish || "unknown"}${counted}`);
  } catch (err) {
    if (err.name === "AbortError") {
      // Keep what arrived: the stopped answer stays part of the conversation.
      chat.history.push(turn, { role: "assistant", content: reply });
      answer.dataset.state = "stopped";
      setNote(answer, "stopped");
    } else {
      // The turn did not happen: not part of the history; show why.
      answer.dataset.state = "failed";
      asked.classList.add("failed");
      setNote(asked, "not answered, not kept in the conversation (see the error)");
      if (!reply) answer.remove();
      showError(err.message);
    }
  } finally {
    answer.removeAttribute("aria-busy");
    chat.controller = null;
    setBusy(false);
    ui.message.focus();
  }
}

function stop() {
  if (chat.controller) chat.controller.abort();
}

function newChat() {
  stop();
  chat.history = [];
  detachImage();
  clearError();
  ui.conversation.querySelectorAll(".message").forEach((m) => m.remove());
  ui.emptyNote.hidden = false;
  ui.message.focus();
}

// ---- wiring ---------------------------------------------------------------------------

ui.apiKey.value = localStorage.getItem(API_KEY_STORAGE) || "";
ui.apiKey.addEventListener("change", () => {
  localStorage.setItem(API_KEY_STORAGE, ui.apiKey.value.trim());
  loadModels();
});
ui.composer.addEventListener("submit", send);
ui.stop.addEventListener("click", stop);
ui.newChat.addEventListener("click", newChat);
ui.image.addEventListener("change", () => attachImage(ui.image.files[0]));
ui.removeImage.addEventListener("click", detachImage);
ui.message.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    ui.composer.requestSubmit();
  }
});
ui.message.addEventListener("paste", (e) => {
  const item = [...(e.clipboardData ? e.clipboardData.items : [])].find(
    (i) => i.kind === "file" && i.type.startsWith("image/"),
  );
  if (item) {
    e.preventDefault();
    attachImage(item.getAsFile());
  }
});
loadModels();
