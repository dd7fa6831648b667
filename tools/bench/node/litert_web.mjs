// LiteRT.js (@litertjs/core: LiteRT with XNNPACK compiled to WebAssembly, one thread) under
// node: median ms of a .tflite model, and its output on a given input. Used by
// tools/bench/tvm_wasm.py (--litert-js DIR, where DIR holds node_modules/@litertjs/core:
// `npm install --prefix DIR @litertjs/core@2.5.3`).
//   node litert_web.mjs DIR MODEL.tflite INPUT.f32 d0,d1,... RUNS OUTPUT.f32
// INPUT.f32 / OUTPUT.f32: raw little-endian float32 (the input in the model's layout).
import { readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { dirname, join } from 'node:path';
import { runInThisContext } from 'node:vm';
import { createRequire } from 'node:module';

// LiteRT.js loads its Emscripten glue as a browser <script> or, in a worker, with importScripts:
// give node the worker's form (the glue itself runs under node: it reads the .wasm with fs).
globalThis.self = globalThis;
globalThis.require = createRequire(import.meta.url);
globalThis.importScripts = (url) => {
  const path = String(url).startsWith('file:') ? fileURLToPath(String(url)) : String(url);
  globalThis.__dirname = dirname(path);
  runInThisContext(readFileSync(path, 'utf8'), { filename: path });
};

const [dir, model, input, dims, runs, output] = process.argv.slice(2);
const core = join(dir, 'node_modules', '@litertjs', 'core');
const { loadLiteRt, loadAndCompile, Tensor } = await import(pathToFileURL(join(core, 'dist', 'index.js')));
await loadLiteRt(join(core, 'wasm') + '/');
const compiled = await loadAndCompile(new Uint8Array(readFileSync(model)), {
  accelerator: 'wasm',
  cpuOptions: { numThreads: 1 },
});
const raw = readFileSync(input);
const data = new Float32Array(raw.buffer, raw.byteOffset, raw.byteLength / 4);
const shape = dims.split(',').map(Number);
const once = async () => {
  const x = new Tensor(data.slice(), shape);
  const outs = await compiled.run([x]);
  x.delete();
  return outs;
};
const first = await once();
const y = await first[0].moveTo('wasm');
writeFileSync(output, Buffer.from(y.toTypedArray().buffer.slice(0)));
for (const t of first) t.delete();
const ts = [];
for (let i = 0; i < Number(runs) + 1; i++) {
  const t0 = process.hrtime.bigint();
  const outs = await once();
  ts.push(Number(process.hrtime.bigint() - t0) / 1e6);
  for (const t of outs) t.delete();
}
ts.shift(); // the second call still warms caches
ts.sort((a, b) => a - b);
console.log(JSON.stringify({ median_ms: ts[Math.floor(ts.length / 2)] }));
process.exit(0);
