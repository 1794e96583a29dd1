// The chat page: one image, a conversation, answers streamed from /v1/chat/completions.
// No framework and no build step; the API key stays in its input field (memory only).
"use strict";

const $ = (id) => document.getElementById(id);
const server = document.body.dataset; // model, needsKey, maxTokens: written by the front
const state = { messages: [], image: null, controller: null, previewUrl: null };

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

// The API's own words: "401: missing or invalid API key: ...".
async function apiError(response) {
  let message = response.statusText;
  try {
    message = (await response.json()).error.message;
  } catch (_) { /* not our JSON error: the status text stands */ }
  return `${response.status}: ${message}`;
}

async function post(path, body, signal) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!response.ok) throw new Error(await apiError(response));
  return response;
}

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// Browsers give .dcm files no type; the API reads application/dicom as DICOM, preamble or not.
function mimeOf(file) {
  if (/\.dcm$/i.test(file.name) || file.type === "application/dicom") return "application/dicom";
  return file.type || "application/octet-stream";
}

function showPreview(blob) {
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = blob ? URL.createObjectURL(blob) : null;
  $("figure").hidden = !blob;
  if (blob) $("preview").src = state.previewUrl;
  else $("preview").removeAttribute("src");
}

// The image goes with the first question; a new one starts a new conversation.
async function chooseImage(file) {
  if (!file) return;
  clearConversation();
  state.image = null;
  showPreview(null);
  setStatus("Checking the image…");
  try {
    const read = await readDataUrl(file);
    const url = `data:${mimeOf(file)};base64,` + read.slice(read.indexOf(",") + 1);
    const response = await post("v1/images/preview", { image_url: { url } });
    showPreview(await response.blob());
    state.image = url;
    setStatus("Image ready: ask a question.");
  } catch (e) {
    setStatus(e.message, true);
  }
}

function addTurn(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("log").append(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

// Server-sent events from a fetch body: one parsed JSON object per `data:` event.
async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).split("\n")
        .filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trim()).join("\n");
      buffer = buffer.slice(end + 2);
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// Reads the stream into `answer`; the finish reason, or throws the API's error.
async function stream(response, answer) {
  let finish = null;
  for await (const event of events(response.body)) {
    if (event.error) throw new Error(event.error.message);
    const choice = (event.choices || [])[0];
    if (!choice) continue;
    if (choice.delta && choice.delta.content) {
      answer.textContent += choice.delta.content;
      answer.dataset.updates = Number(answer.dataset.updates) + 1;
      $("log").scrollTop = $("log").scrollHeight;
    }
    finish = choice.finish_reason || finish;
  }
  return finish;
}

async function send() {
  const text = $("question").value.trim();
  if (!text || state.controller) return;
  const first = state.messages.length === 0 && state.image;
  const content = first ? [{ type: "image_url", image_url: { url: state.image } }, { type: "text", text }] : text;
  const messages = [...state.messages, { role: "user", content }];
  const asked = addTurn("user", text);
  const answer = addTurn("assistant", "");
  answer.dataset.updates = "0";
  $("question").value = "";
  const controller = (state.controller = new AbortController());
  setBusy(true);
  setStatus("Answering…");
  try {
    const body = { model: server.model, messages, stream: true, max_tokens: Number($("max-tokens").value) };
    const finish = await stream(await post("v1/chat/completions", body, controller.signal), answer);
    if (state.controller === controller) setStatus(finish === "length" ? "Done: the answer reached max tokens." : "Done.");
  } catch (e) {
    if (state.controller === controller) setStatus(e.name === "AbortError" ? "Stopped." : e.message, e.name !== "AbortError");
  } finally {
    answer.dataset.done = "true";
    if (state.controller === controller) { // not cleared meanwhile
      state.controller = null;
      setBusy(false);
      keep(messages, asked, answer, text);
    }
  }
}

// A turn with an answer (whole or stopped) joins the conversation; one with none is undone
// and its question goes back to the box.
function keep(messages, asked, answer, text) {
  if (answer.textContent) {
    state.messages = [...messages, { role: "assistant", content: answer.textContent }];
  } else {
    asked.remove();
    answer.remove();
    $("question").value = text;
  }
}

function clearConversation() {
  if (state.controller) state.controller.abort();
  state.controller = null;
  state.messages = [];
  $("log").replaceChildren();
  setBusy(false);
  setStatus("");
}

function wire() {
  $("max-tokens").value = server.maxTokens;
  $("preview").addEventListener("load", () => {
    const img = $("preview");
    $("caption").textContent = `As the model sees it: ${img.naturalWidth}×${img.naturalHeight} px`;
  });
  $("ask").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { // not while an IME composes Chinese
      e.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("clear").addEventListener("click", () => {
    clearConversation();
    state.image = null;
    showPreview(null);
    $("file").value = "";
  });
  $("file").addEventListener("change", () => chooseImage($("file").files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    chooseImage(e.dataTransfer.files[0]);
  });
}

wire();
