// vaelab explorer: the run's MLP encoder and decoder in plain JavaScript, and the page around them.
// Everything it needs is in the JSON block above; it makes no network request.
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("vaelab-data").textContent);
  const K = DATA.latentDim;
  const [C, H, W] = DATA.imageShape;
  const D = C * H * W;
  const E = DATA.extent; // the pad shows [-E, E] on both axes
  const U = DATA.dirs; // (2, K): the pad's axes in latent space (rows orthonormal or zero)
  const CENTER = DATA.center; // (K): latent point at the pad's centre
  const $ = (id) => document.getElementById(id);

  // --- weights ----------------------------------------------------------------------------

  const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

  function bytes(b64) {
    const s = atob(b64);
    const out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }

  function floats(b64) {
    const u8 = bytes(b64); // little-endian float32 from Python
    if (!LITTLE_ENDIAN) {
      for (let i = 0; i < u8.length; i += 4) {
        let t = u8[i]; u8[i] = u8[i + 3]; u8[i + 3] = t;
        t = u8[i + 1]; u8[i + 1] = u8[i + 2]; u8[i + 2] = t;
      }
    }
    return new Float32Array(u8.buffer, 0, u8.length / 4);
  }

  function layer(spec) {
    // weight (out, in) row-major as in torch.nn.Linear; buffers in float64
    return { nIn: spec.in, nOut: spec.out, w: floats(spec.w), b: floats(spec.b), y: new Float64Array(spec.out) };
  }

  const encoder = {
    body: DATA.encoder.body.map(layer), mean: layer(DATA.encoder.mean), logVar: layer(DATA.encoder.logVar),
  };
  const decoder = { body: DATA.decoder.body.map(layer), out: layer(DATA.decoder.out) };

  // --- the networks -----------------------------------------------------------------------

  function dense(L, x) { // y = W x + b
    const { nIn, nOut, w, b, y } = L;
    for (let j = 0, row = 0; j < nOut; j++, row += nIn) {
      let s = b[j];
      for (let i = 0; i < nIn; i++) s += w[row + i] * x[i];
      y[j] = s;
    }
    return y;
  }

  const activate = {
    relu(v) { for (let i = 0; i < v.length; i++) if (v[i] < 0) v[i] = 0; },
    tanh(v) { for (let i = 0; i < v.length; i++) v[i] = Math.tanh(v[i]); },
    elu(v) { for (let i = 0; i < v.length; i++) if (v[i] < 0) v[i] = Math.expm1(v[i]); },
  }[DATA.activation];

  function body(layers, x) {
    let h = x;
    for (const L of layers) { h = dense(L, h); activate(h); }
    return h;
  }

  const zIn = new Float64Array(K);
  const xIn = new Float64Array(D);

  function checkLength(a, n, what) {
    if (!a || a.length !== n) throw new Error(`${what}: expected ${n} numbers, got ${a ? a.length : a}`);
  }

  // p(x|z): latent (K) -> pixel probabilities (D) in [0, 1], written into `out`
  function decodeInto(z, out) {
    for (let i = 0; i < K; i++) zIn[i] = z[i];
    const logits = dense(decoder.out, body(decoder.body, zIn));
    for (let j = 0; j < D; j++) out[j] = 1 / (1 + Math.exp(-logits[j]));
    return out;
  }

  function decode(z) {
    checkLength(z, K, "decode");
    return decodeInto(z, new Float32Array(D));
  }

  // q(z|x): pixels (D) in [0, 1], laid out (C, H, W) -> posterior mean and log-variance (K each)
  function posterior(pixels) {
    checkLength(pixels, D, "encode");
    for (let i = 0; i < D; i++) xIn[i] = pixels[i];
    const h = body(encoder.body, xIn);
    return { mean: Array.from(dense(encoder.mean, h)), logVar: Array.from(dense(encoder.logVar, h)) };
  }

  // --- state --------------------------------------------------------------------------------

  const z = new Float64Array(K); // the point; starts at the prior's mode, 0
  const image = new Float32Array(D);
  let ends = { a: DATA.a.slice(), b: DATA.b.slice() };
  let drawn = null; // the drawing's preprocessed pixels (Float32Array D)
  let drawnMean = null;

  function padCoords(v) { // latent -> pad (a, b)
    const ab = [0, 0];
    for (let r = 0; r < 2; r++) for (let i = 0; i < K; i++) ab[r] += U[r][i] * (v[i] - CENTER[i]);
    return ab;
  }

  function setPadCoords(a, b) { // move z so that its pad coordinates are (a, b); other directions stay
    const [a0, b0] = padCoords(z);
    for (let i = 0; i < K; i++) z[i] += U[0][i] * (a - a0) + U[1][i] * (b - b0);
    requestRender();
  }

  // --- drawing images -----------------------------------------------------------------------

  function paint(canvas, pixels) {
    if (canvas.width !== W || canvas.height !== H) { canvas.width = W; canvas.height = H; }
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(W, H);
    const plane = H * W;
    for (let p = 0; p < plane; p++) {
      for (let c = 0; c < 3; c++) {
        const v = pixels ? pixels[(C === 3 ? c * plane : 0) + p] : 0;
        img.data[4 * p + c] = Math.round(Math.min(1, Math.max(0, v)) * 255);
      }
      img.data[4 * p + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
  }

  // --- the pad --------------------------------------------------------------------------------

  const pad = $("pad");
  const padCanvas = $("pad-canvas");
  const scatterCanvas = document.createElement("canvas");
  const points = DATA.points.n ? floats(DATA.points.xy) : new Float32Array(0);
  const labels = DATA.points.labels ? bytes(DATA.points.labels) : null;
  let S = 0; // pad size in device pixels

  function toPx(a, b) { return [((a + E) / (2 * E)) * S, ((E - b) / (2 * E)) * S]; }

  function layoutPad() {
    const size = Math.max(1, Math.round(pad.clientWidth * (window.devicePixelRatio || 1)));
    if (size === S) return;
    S = size;
    padCanvas.width = padCanvas.height = S;
    drawScatter();
    render();
  }

  function drawScatter() {
    scatterCanvas.width = scatterCanvas.height = S;
    const ctx = scatterCanvas.getContext("2d");
    const px = S / 400; // one CSS-ish unit at a 400 px pad
    ctx.fillStyle = "#fbfcfd";
    ctx.fillRect(0, 0, S, S);
    // grid: integer values (every 2 when the range is wide), the axes through 0 darker
    const step = E > 6 ? 2 : 1;
    ctx.lineWidth = Math.max(1, px);
    ctx.font = `${Math.round(11 * px)}px system-ui, sans-serif`;
    ctx.fillStyle = "#8c959f";
    for (let v = -Math.floor(E / step) * step; v <= E; v += step) {
      const [x, y] = toPx(v, v);
      ctx.strokeStyle = v === 0 ? "#afb8c1" : "#eaeef2";
      ctx.beginPath(); ctx.moveTo(x, 0); ctx.lineTo(x, S); ctx.moveTo(0, y); ctx.lineTo(S, y); ctx.stroke();
      if (v !== 0) {
        ctx.fillText(String(v), x + 2 * px, S / 2 - 3 * px);
        ctx.fillText(String(v), S / 2 + 3 * px, y - 2 * px);
      }
    }
    const r = Math.max(1, 1.6 * px);
    ctx.globalAlpha = 0.65;
    for (let i = 0; i < DATA.points.n; i++) {
      const [x, y] = toPx(points[2 * i], points[2 * i + 1]);
      ctx.fillStyle = labels ? DATA.palette[labels[i] % DATA.palette.length] : "#57606a";
      ctx.beginPath(); ctx.arc(x, y, r, 0, 2 * Math.PI); ctx.fill();
    }
    ctx.globalAlpha = 1;
    ctx.fillStyle = "#57606a";
    ctx.font = `${Math.round(12 * px)}px system-ui, sans-serif`;
    const ex = DATA.explained;
    const pct = (i) => (ex ? ` (${Math.round(ex[i] * 100)}% of variance)` : "");
    const [xName, yName] = K === 2 ? ["z[0] →", "↑ z[1]"] : [`PC 1${pct(0)} →`, `↑ PC 2${pct(1)}`];
    ctx.textAlign = "right";
    ctx.fillText(xName, S - 6 * px, S - 8 * px);
    ctx.textAlign = "left";
    ctx.fillText(yName, 6 * px, 16 * px);
  }

  function drawPad() {
    if (!S) return;
    const ctx = padCanvas.getContext("2d");
    const px = S / 400;
    ctx.drawImage(scatterCanvas, 0, 0);
    const clamp = (v) => Math.min(S - 2 * px, Math.max(2 * px, v));
    const [ax, ay] = toPx(...padCoords(ends.a));
    const [bx, by] = toPx(...padCoords(ends.b));
    ctx.setLineDash([6 * px, 5 * px]);
    ctx.strokeStyle = "#24292f";
    ctx.lineWidth = 1.5 * px;
    ctx.beginPath(); ctx.moveTo(ax, ay); ctx.lineTo(bx, by); ctx.stroke();
    ctx.setLineDash([]);
    for (const [name, x, y] of [["A", ax, ay], ["B", bx, by]]) {
      const s = 9 * px;
      ctx.fillStyle = "#24292f";
      ctx.fillRect(clamp(x) - s, clamp(y) - s, 2 * s, 2 * s);
      ctx.fillStyle = "#fff";
      ctx.font = `bold ${Math.round(12 * px)}px system-ui, sans-serif`;
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText(name, clamp(x), clamp(y) + px);
    }
    ctx.textBaseline = "alphabetic";
    const [x, y] = toPx(...padCoords(z));
    const inside = x >= 0 && x <= S && y >= 0 && y <= S;
    ctx.beginPath();
    ctx.arc(clamp(x), clamp(y), 10 * px, 0, 2 * Math.PI);
    ctx.fillStyle = inside ? "rgba(255,255,255,0.85)" : "rgba(255,255,255,0.4)";
    ctx.fill();
    ctx.lineWidth = 3 * px;
    ctx.strokeStyle = "#0b5cad";
    ctx.stroke();
    ctx.beginPath();
    ctx.arc(clamp(x), clamp(y), 2.5 * px, 0, 2 * Math.PI);
    ctx.fillStyle = "#0b5cad";
    ctx.fill();
  }

  let dragging = null;

  function movePadTo(e) {
    const r = padCanvas.getBoundingClientRect();
    const a = ((e.clientX - r.left) / r.width) * 2 * E - E;
    const b = E - ((e.clientY - r.top) / r.height) * 2 * E;
    setPadCoords(Math.min(E, Math.max(-E, a)), Math.min(E, Math.max(-E, b)));
  }

  pad.addEventListener("pointerdown", (e) => {
    if (e.pointerType === "mouse" && e.button !== 0) return;
    dragging = e.pointerId;
    try { pad.setPointerCapture(e.pointerId); } catch (_) { /* synthetic pointer: no capture */ }
    pad.focus({ preventScroll: true });
    movePadTo(e);
    e.preventDefault();
  });
  pad.addEventListener("pointermove", (e) => { if (e.pointerId === dragging) movePadTo(e); });
  for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) {
    pad.addEventListener(type, (e) => { if (e.pointerId === dragging) dragging = null; });
  }
  pad.addEventListener("keydown", (e) => {
    const step = (e.shiftKey ? 0.1 : 0.02) * E;
    const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, step], ArrowDown: [0, -step] };
    const move = moves[e.key];
    if (!move) return;
    const [a, b] = padCoords(z);
    setPadCoords(a + move[0], b + move[1]);
    e.preventDefault();
  });

  // --- sliders ------------------------------------------------------------------------------

  const sliders = [];
  const sliderBox = $("sliders");
  for (let d = 0; d < Math.min(K, DATA.maxSliders); d++) {
    const range = DATA.sliderRange[d];
    const label = document.createElement("label");
    label.htmlFor = `z${d}`;
    label.textContent = `z[${d}]`;
    const input = document.createElement("input");
    Object.assign(input, { type: "range", id: `z${d}`, min: -range, max: range, step: 0.01, value: 0 });
    const output = document.createElement("output");
    output.htmlFor = input.id;
    output.id = `z${d}-value`;
    input.setAttribute("aria-describedby", output.id);
    input.addEventListener("input", () => { z[d] = Number(input.value); requestRender(); });
    const row = document.createElement("div");
    row.className = "slider";
    row.append(label, input, output);
    sliderBox.append(row);
    sliders.push({ input, output });
  }

  // --- rendering ----------------------------------------------------------------------------

  const imageCanvas = $("image");
  let pending = false;

  function requestRender() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { if (pending) render(); });
  }

  const fmt = (v) => (Math.abs(v) < 0.005 ? "0.00" : v.toFixed(2));

  function render() {
    pending = false;
    decodeInto(z, image);
    paint(imageCanvas, image);
    drawPad();
    for (let d = 0; d < sliders.length; d++) {
      const { input, output } = sliders[d];
      if (document.activeElement !== input || Number(input.value) !== z[d]) input.value = z[d];
      output.textContent = fmt(z[d]);
    }
    const shown = Array.from(z.slice(0, 8), fmt).join(", ") + (K > 8 ? ", …" : "");
    $("readout").textContent = `z = [${shown}]`;
    const [a, b] = padCoords(z);
    pad.setAttribute("aria-valuenow", a.toFixed(2));
    pad.setAttribute("aria-valuetext", K === 2
      ? `z[0] ${fmt(a)}, z[1] ${fmt(b)}`
      : `principal direction 1: ${fmt(a)}, principal direction 2: ${fmt(b)}`);
  }

  function announce(text) { $("status").textContent = text; }

  // --- buttons ------------------------------------------------------------------------------

  function gaussian() { // Box-Muller
    let u = 0;
    while (u === 0) u = Math.random();
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * Math.random());
  }

  $("random").addEventListener("click", () => {
    for (let i = 0; i < K; i++) z[i] = gaussian();
    requestRender();
    announce("Moved the point to a random sample from the prior.");
  });
  $("reset").addEventListener("click", () => {
    z.fill(0);
    requestRender();
    announce("Moved the point back to the origin.");
  });
  $("set-a").addEventListener("click", () => setEnd("a"));
  $("set-b").addEventListener("click", () => setEnd("b"));

  function setEnd(which) {
    ends[which] = Array.from(z);
    renderStrip();
    requestRender();
    announce(`Set ${which.toUpperCase()} to the current point.`);
  }

  // --- the interpolation strip --------------------------------------------------------------

  const strip = $("strip");
  const frames = [];
  for (let f = 0; f < DATA.stripFrames; f++) {
    const t = f / (DATA.stripFrames - 1);
    const button = document.createElement("button");
    button.type = "button";
    const canvas = document.createElement("canvas");
    canvas.className = "digit";
    const caption = document.createElement("span");
    caption.textContent = f === 0 ? "A" : f === DATA.stripFrames - 1 ? "B" : t.toFixed(2);
    button.setAttribute("aria-label", `Move the point to ${Math.round(t * 100)}% of the way from A to B`);
    button.append(canvas, caption);
    button.addEventListener("click", () => {
      const p = lerp(t);
      for (let i = 0; i < K; i++) z[i] = p[i];
      requestRender();
    });
    strip.append(button);
    frames.push({ t, canvas });
  }

  function lerp(t) { return ends.a.map((a, i) => a + t * (ends.b[i] - a)); }

  function renderStrip() {
    const out = new Float32Array(D);
    for (const { t, canvas } of frames) paint(canvas, decodeInto(lerp(t), out));
  }

  // --- the drawing canvas -------------------------------------------------------------------

  const draw = $("draw");
  const dctx = draw.getContext("2d", { willReadFrequently: true });
  const N = draw.width; // 280: drawing resolution
  let stroke = null;
  let encodePending = false;

  function clearDrawing() {
    dctx.fillStyle = "#000";
    dctx.fillRect(0, 0, N, N);
    drawn = null;
    drawnMean = null;
    paint($("drawn-input"), null);
    paint($("drawn-recon"), null);
  }

  function drawPoint(e) {
    const r = draw.getBoundingClientRect();
    return [((e.clientX - r.left) / r.width) * N, ((e.clientY - r.top) / r.height) * N];
  }

  function line(from, to) {
    dctx.strokeStyle = "#fff";
    dctx.lineWidth = N / 12.5; // a pen about 2.2 px wide at MNIST scale for a digit of ordinary size
    dctx.lineCap = dctx.lineJoin = "round";
    dctx.beginPath();
    dctx.moveTo(from[0], from[1]);
    dctx.lineTo(to[0], to[1]);
    dctx.stroke();
  }

  draw.addEventListener("pointerdown", (e) => {
    if (e.pointerType === "mouse" && e.button !== 0) return;
    try { draw.setPointerCapture(e.pointerId); } catch (_) { /* synthetic pointer: no capture */ }
    const p = drawPoint(e);
    stroke = { id: e.pointerId, last: p };
    line(p, p);
    e.preventDefault();
  });
  draw.addEventListener("pointermove", (e) => {
    if (!stroke || e.pointerId !== stroke.id) return;
    const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [];
    for (const ev of events.length ? events : [e]) {
      const p = drawPoint(ev);
      line(stroke.last, p);
      stroke.last = p;
    }
    if (!encodePending) {
      encodePending = true;
      requestAnimationFrame(() => { if (encodePending) encodeDrawing(); });
    }
  });
  for (const type of ["pointerup", "pointercancel"]) {
    draw.addEventListener(type, (e) => {
      if (!stroke || e.pointerId !== stroke.id) return;
      if (type === "pointerup") line(stroke.last, drawPoint(e));
      stroke = null;
      encodeDrawing();
      announce("Encoded your drawing: the point moved to its latent mean.");
    });
  }
  $("clear").addEventListener("click", () => { clearDrawing(); announce("Cleared the drawing."); });

  // The drawing (N x N, ink = red channel) as an MNIST digit: scaled so the longer side of its
  // bounding box is 20/28 of the image, placed so its centre of mass is the image's centre, and
  // area-averaged down to H x W values in [0, 1]; every channel gets the same grey.
  function preprocess(rgba) {
    let x0 = N, x1 = -1, y0 = N, y1 = -1;
    for (let y = 0; y < N; y++) {
      for (let x = 0; x < N; x++) {
        if (rgba[4 * (y * N + x)] > 10) {
          if (x < x0) x0 = x; if (x > x1) x1 = x; if (y < y0) y0 = y; if (y > y1) y1 = y;
        }
      }
    }
    if (x1 < 0) return null;
    let mass = 0, mx = 0, my = 0;
    for (let y = y0; y <= y1; y++) {
      for (let x = x0; x <= x1; x++) {
        const v = rgba[4 * (y * N + x)] / 255;
        mass += v; mx += v * (x + 0.5); my += v * (y + 0.5);
      }
    }
    const cx = mx / mass, cy = my / mass;
    const s = ((20 / 28) * Math.min(H, W)) / Math.max(x1 - x0 + 1, y1 - y0 + 1); // target px per drawn px
    const grey = new Float64Array(H * W);
    for (let y = y0; y <= y1; y++) {
      const ty0 = (y - cy) * s + H / 2, ty1 = ty0 + s;
      for (let x = x0; x <= x1; x++) {
        const v = rgba[4 * (y * N + x)] / 255;
        if (v === 0) continue;
        const tx0 = (x - cx) * s + W / 2, tx1 = tx0 + s;
        for (let ty = Math.max(0, Math.floor(ty0)); ty < Math.min(H, ty1); ty++) {
          const oy = Math.min(ty1, ty + 1) - Math.max(ty0, ty);
          for (let tx = Math.max(0, Math.floor(tx0)); tx < Math.min(W, tx1); tx++) {
            const ox = Math.min(tx1, tx + 1) - Math.max(tx0, tx);
            if (ox > 0 && oy > 0) grey[ty * W + tx] += v * ox * oy; // share of the target pixel covered
          }
        }
      }
    }
    const pixels = new Float32Array(D);
    for (let c = 0; c < C; c++) {
      for (let p = 0; p < H * W; p++) pixels[c * H * W + p] = Math.min(1, grey[p]);
    }
    return pixels;
  }

  function encodeDrawing() {
    encodePending = false;
    const pixels = preprocess(dctx.getImageData(0, 0, N, N).data);
    if (!pixels) return;
    drawn = pixels;
    drawnMean = posterior(pixels).mean;
    for (let i = 0; i < K; i++) z[i] = drawnMean[i];
    paint($("drawn-input"), pixels);
    paint($("drawn-recon"), decode(drawnMean));
    render();
  }

  // --- start --------------------------------------------------------------------------------

  pad.setAttribute("aria-valuemin", (-E).toFixed(2));
  pad.setAttribute("aria-valuemax", E.toFixed(2));
  clearDrawing();
  renderStrip();
  new ResizeObserver(layoutPad).observe(pad);
  layoutPad();
  render();

  function renderNow() { if (pending) render(); }

  // Hooks for tests and for people at the console.
  window.vaelab = Object.freeze({
    info: Object.freeze({ latentDim: K, imageShape: [C, H, W], activation: DATA.activation, extent: E }),
    decode, // (latent array) -> Float32Array of D pixel probabilities
    encode: (pixels) => posterior(pixels).mean, // (D pixels in [0, 1]) -> posterior mean
    posterior, // -> {mean, logVar}
    setPoint(v) { checkLength(v, K, "setPoint"); for (let i = 0; i < K; i++) z[i] = v[i]; render(); },
    getPoint: () => Array.from(z),
    getImage() { renderNow(); return Float32Array.from(image); }, // the image on show
    getDrawing: () => (drawn ? Float32Array.from(drawn) : null), // the drawing as the model saw it
    getDrawingMean: () => (drawnMean ? drawnMean.slice() : null),
    clearDrawing,
    setA: () => setEnd("a"),
    setB: () => setEnd("b"),
    getEnds: () => ({ a: ends.a.slice(), b: ends.b.slice() }),
    markerPosition() { // the point's position on screen (CSS pixels, viewport coordinates)
      renderNow();
      const r = padCanvas.getBoundingClientRect();
      const [a, b] = padCoords(z);
      return { x: r.left + ((a + E) / (2 * E)) * r.width, y: r.top + ((E - b) / (2 * E)) * r.height };
    },
    benchmark(n = 1000) { // milliseconds per decode, and per whole frame (decode + drawing)
      const out = new Float32Array(D);
      const v = Array.from({ length: K }, gaussian);
      let t = performance.now();
      for (let i = 0; i < n; i++) { v[i % K] += 1e-3; decodeInto(v, out); }
      const decodeMs = (performance.now() - t) / n;
      const saved = Float64Array.from(z);
      t = performance.now();
      for (let i = 0; i < n; i++) { z[i % K] += 1e-3; render(); }
      const frameMs = (performance.now() - t) / n;
      z.set(saved);
      render();
      return { decodeMs, frameMs };
    },
  });
})();
