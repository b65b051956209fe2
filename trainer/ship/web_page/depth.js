// The page's logic: read a photo, prepare it exactly as `trainer.ship.predict` does in Python, run the
// student with onnxruntime-web and draw the photo and its colour-mapped depth side by side.
//
// Exactness (tests/test_web_page.py compares this page with onnxruntime in Python):
// - decoding: the browser's JPEG/PNG decoder, EXIF orientation applied, colour profile ignored
//   (`colorSpaceConversion: "none"`), as Pillow ignores it;
// - resize: Pillow's BILINEAR `Image.resize` (libImaging/Resample.c), re-implemented step for step:
//   a triangle filter widened by the downscale factor (antialiasing), coefficients in 22-bit fixed
//   point, a horizontal pass rounded to 8 bits, then a vertical pass;
// - normalisation: torchvision's float32 steps, x * float32(1/255), minus mean, divided by std,
//   each rounded to float32 (Math.fround), with mean and std from the model's own report;
// - the input size (and the colour map) come from the files the export wrote beside the model.
"use strict";

const PRECISION_BITS = 32 - 8 - 2;  // Resample.c: fixed point for 8-bit images
const FIXED_ONE = 2 ** PRECISION_BITS;
const FIXED_HALF = 2 ** (PRECISION_BITS - 1);
const FIXED_MAX = 2 ** (PRECISION_BITS + 8);

// Resample.c precompute_coeffs (bilinear filter, support 1) then normalize_coeffs_8bpc.
function filterCoefficients(inSize, outSize) {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1.0);
  const support = 1.0 * filterScale;
  const kernelSize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const weights = new Float64Array(outSize * kernelSize);  // whole numbers below 2**22
  const raw = new Float64Array(kernelSize);
  for (let out = 0; out < outSize; out++) {
    const center = (out + 0.5) * scale;
    const inverse = 1.0 / filterScale;
    let first = Math.trunc(center - support + 0.5);  // C's (int) cast
    if (first < 0) first = 0;
    let last = Math.trunc(center + support + 0.5);
    if (last > inSize) last = inSize;
    const count = last - first;
    let total = 0.0;
    for (let i = 0; i < count; i++) {
      const t = Math.abs((i + first - center + 0.5) * inverse);
      raw[i] = t < 1.0 ? 1.0 - t : 0.0;
      total += raw[i];
    }
    for (let i = 0; i < count; i++) {
      const w = total !== 0.0 ? raw[i] / total : raw[i];
      weights[out * kernelSize + i] = w < 0 ? Math.trunc(-0.5 + w * FIXED_ONE) : Math.trunc(0.5 + w * FIXED_ONE);
    }
    bounds[out * 2] = first;
    bounds[out * 2 + 1] = count;
  }
  return { bounds, weights, kernelSize };
}

function clip8(sum) {  // Resample.c clip8: the sums are non-negative for the bilinear filter
  if (sum >= FIXED_MAX) return 255;
  if (sum <= 0) return 0;
  return Math.floor(sum / FIXED_ONE);
}

// One pass of the separable resize over `lines` lines of RGB(A) pixels: along a line, `step`
// apart; from line to line, `lineStep` apart.
function resamplePass(src, dst, lines, outCount, coefficients, srcStep, srcLineStep, srcOffset,
                      dstStep, dstLineStep) {
  const { bounds, weights, kernelSize } = coefficients;
  for (let line = 0; line < lines; line++) {
    const srcLine = srcOffset + line * srcLineStep;
    for (let out = 0; out < outCount; out++) {
      const first = bounds[out * 2];
      const count = bounds[out * 2 + 1];
      const k = out * kernelSize;
      let r = FIXED_HALF, g = FIXED_HALF, b = FIXED_HALF;
      for (let i = 0; i < count; i++) {
        const p = srcLine + (first + i) * srcStep;
        const w = weights[k + i];
        r += src[p] * w;
        g += src[p + 1] * w;
        b += src[p + 2] * w;
      }
      const q = line * dstLineStep + out * dstStep;
      dst[q] = clip8(r);
      dst[q + 1] = clip8(g);
      dst[q + 2] = clip8(b);
    }
  }
}

// RGBA pixels (width x height) -> RGB uint8 pixels (size x size): Pillow's
// `image.resize((size, size), Image.Resampling.BILINEAR)` on the RGB image.
function resizeLikePillow(rgba, width, height, size) {
  const horizontal = filterCoefficients(width, size);
  const vertical = filterCoefficients(height, size);
  const needHorizontal = width !== size;
  const needVertical = height !== size;
  let pixels = rgba, channels = 4, rowWidth = width, rowOffset = 0;
  if (needHorizontal) {
    // Only the rows the vertical pass reads, as Resample.c does.
    const firstRow = needVertical ? vertical.bounds[0] : 0;
    const lastRow = needVertical ? vertical.bounds[size * 2 - 2] + vertical.bounds[size * 2 - 1] : height;
    const rows = lastRow - firstRow;
    const temp = new Uint8Array(size * rows * 3);
    resamplePass(rgba, temp, rows, size, horizontal, 4, width * 4, firstRow * width * 4, 3, size * 3);
    for (let out = 0; out < size; out++) vertical.bounds[out * 2] -= firstRow;
    pixels = temp; channels = 3; rowWidth = size; rowOffset = 0;
  }
  const result = new Uint8Array(size * size * 3);
  if (needVertical) {
    // Columns are the lines here: along a column pixels are a row apart.
    resamplePass(pixels, result, size, size, vertical, rowWidth * channels, channels, rowOffset,
                 size * 3, 3);
  } else {
    for (let p = 0, q = 0; q < result.length; p += channels, q += 3) {
      result[q] = pixels[p]; result[q + 1] = pixels[p + 1]; result[q + 2] = pixels[p + 2];
    }
  }
  return result;
}

// RGB uint8 (size x size) -> the model's float32 NCHW input, as torchvision's
// to_dtype(scale=True) then normalize compute it.
function normalize(rgb, size, mean, std) {
  const plane = size * size;
  const input = new Float32Array(3 * plane);
  const scale = Math.fround(1 / 255);
  for (let c = 0; c < 3; c++) {
    const m = Math.fround(mean[c]);
    const s = Math.fround(std[c]);
    for (let i = 0; i < plane; i++) {
      const x = Math.fround(rgb[i * 3 + c] * scale);
      input[c * plane + i] = Math.fround(Math.fround(x - m) / s);
    }
  }
  return input;
}

// torch.quantile's linear interpolation between the two nearest ranks.
function quantile(sorted, q) {
  const position = q * (sorted.length - 1);
  const below = Math.floor(position);
  const above = Math.min(below + 1, sorted.length - 1);
  return sorted[below] + (sorted[above] - sorted[below]) * (position - below);
}

// Disparity -> RGBA, as trainer.evaluate.visualize.colorize: stretched between the 2nd and 98th
// percentiles, then looked up in the colour map (near = the map's high end). For display only: a
// value exactly halfway between two entries may take the other one.
function colourMap(disparity, lut) {
  const sorted = Float32Array.from(disparity).sort();
  const low = quantile(sorted, 0.02);
  const high = quantile(sorted, 0.98);
  const range = Math.max(high - low, 1e-8);
  const rgba = new Uint8ClampedArray(disparity.length * 4);
  for (let i = 0; i < disparity.length; i++) {
    const unit = Math.min(Math.max((disparity[i] - low) / range, 0), 1);
    const colour = lut[Math.round(unit * 255)];
    rgba.set(colour, i * 4);
    rgba[i * 4 + 3] = 255;
  }
  return rgba;
}

async function decodePhoto(blob) {
  const bitmap = await createImageBitmap(blob, {
    imageOrientation: "from-image", colorSpaceConversion: "none", premultiplyAlpha: "none",
  });
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  const pixels = context.getImageData(0, 0, bitmap.width, bitmap.height).data;
  return { bitmap, pixels, width: bitmap.width, height: bitmap.height };
}

// Draws `source` into `canvas` within maxWidth x maxHeight, keeping the photo's aspect ratio.
function drawScaled(canvas, source, width, height, maxWidth, maxHeight) {
  const scale = Math.min(1, maxHeight / height, maxWidth / width);
  canvas.width = Math.max(1, Math.round(width * scale));
  canvas.height = Math.max(1, Math.round(height * scale));
  const context = canvas.getContext("2d");
  context.imageSmoothingEnabled = true;
  context.imageSmoothingQuality = "high";
  context.drawImage(source, 0, 0, canvas.width, canvas.height);
}

const page = {
  state: "loading",
  last: null,
  session: null,
  report: null,
  lut: null,
};

function setState(state, message) {
  page.state = state;
  document.body.dataset.state = state;
  if (message !== undefined) document.getElementById("status").textContent = message;
}

async function loadModel() {
  if (location.protocol === "file:") {
    throw new Error("open this page through a web server, e.g. `python -m http.server -d <this folder>`, "
                    + "not as a file: browsers do not let a file:// page load the model");
  }
  const [report, colours] = await Promise.all([
    fetch("student.onnx.json").then((r) => { if (!r.ok) throw new Error(`student.onnx.json: HTTP ${r.status}`); return r.json(); }),
    fetch("colormap.json").then((r) => { if (!r.ok) throw new Error(`colormap.json: HTTP ${r.status}`); return r.json(); }),
  ]);
  ort.env.wasm.wasmPaths = new URL("./", location.href).href;
  page.session = await ort.InferenceSession.create("student.onnx", { executionProviders: ["wasm"] });
  page.report = report;
  page.lut = colours.lut;
  const threads = ort.env.wasm.numThreads || 1;
  document.getElementById("model").textContent =
    `${report.onnx}: ${report.export_size[0]}x${report.export_size[1]} input, `
    + `onnxruntime-web ${ort.env.versions.web} (WebAssembly, ${threads} thread${threads === 1 ? "" : "s"})`;
}

async function runPhoto(blob) {
  if (!page.session) throw new Error("the model is not loaded yet");
  setState("running", `running on ${blob.name || "the photo"}…`);
  const [size] = page.report.export_size;
  const started = performance.now();
  const photo = await decodePhoto(blob);
  const rgb = resizeLikePillow(photo.pixels, photo.width, photo.height, size);
  const input = normalize(rgb, size, page.report.mean, page.report.std);
  const prepared = performance.now();
  const feeds = { [page.report.input]: new ort.Tensor("float32", input, [1, 3, size, size]) };
  const outputs = await page.session.run(feeds);
  const finished = performance.now();
  const disparity = outputs[page.report.output].data;

  const depth = new OffscreenCanvas(size, size);
  depth.getContext("2d").putImageData(new ImageData(colourMap(disparity, page.lut), size, size), 0, 0);
  // Two panels side by side in the page's width (the gap between them is 16 px).
  const maxWidth = Math.max(64, Math.floor((document.getElementById("panels").clientWidth - 16) / 2));
  const maxHeight = Math.min(480, Math.round(window.innerHeight * 0.7));
  for (const [id, source] of [["photo", photo.bitmap], ["depth", depth]]) {
    drawScaled(document.getElementById(id), source, photo.width, photo.height, maxWidth, maxHeight);
  }

  const modelMs = finished - prepared;
  const prepareMs = prepared - started;
  page.last = { name: blob.name || "", width: photo.width, height: photo.height, size, input, disparity,
                modelMs, prepareMs };
  setState("done", `${blob.name || "photo"} (${photo.width}x${photo.height}): model ${modelMs.toFixed(1)} ms, `
                   + `reading and resizing ${prepareMs.toFixed(1)} ms`);
}

async function runSafely(blob) {
  try {
    await runPhoto(blob);
  } catch (error) {
    const hint = /decode|source image|InvalidStateError/i.test(String(error)) ? " (is it an image file?)" : "";
    setState("error", `could not run on ${blob.name || "the photo"}: ${error.message || error}${hint}`);
  }
}

function wirePage() {
  const picker = document.getElementById("picker");
  picker.addEventListener("change", () => { if (picker.files.length) runSafely(picker.files[0]); });
  const drop = document.getElementById("drop");
  for (const name of ["dragenter", "dragover"]) {
    document.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    document.addEventListener(name, () => drop.classList.remove("over"));
  }
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    const file = event.dataTransfer.files[0];
    if (file) runSafely(file);
  });
}

window.depthDistill = page;
window.addEventListener("DOMContentLoaded", () => {
  wirePage();
  loadModel().then(() => setState("ready", "pick or drop a photo"))
    .catch((error) => setState("error", `could not load the model: ${error.message || error}`));
});
