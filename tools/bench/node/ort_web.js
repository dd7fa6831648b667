// onnxruntime-web (WebAssembly, SIMD, one thread) under node: median ms of a model on a seeded
// input of the given shape. Used by tools/bench/tvm_wasm.py (--ort-web DIR, where DIR holds
// node_modules/onnxruntime-web: `npm install --prefix DIR onnxruntime-web@1.22.0`).
//   node ort_web.js MODEL.onnx d0,d1,... RUNS
const ort = require('onnxruntime-web');
ort.env.wasm.numThreads = 1;
ort.env.wasm.simd = true;
(async () => {
  const [path, dims, runs] = [process.argv[2], process.argv[3].split(',').map(Number), Number(process.argv[4] || 5)];
  const s = await ort.InferenceSession.create(path, { executionProviders: ['wasm'], graphOptimizationLevel: 'all' });
  const n = dims.reduce((a, b) => a * b, 1);
  const data = new Float32Array(n);
  let seed = 1;
  for (let i = 0; i < n; i++) { seed = (seed * 1103515245 + 12345) % 2147483648; data[i] = seed / 2147483648 - 0.5; }
  const feeds = { [s.inputNames[0]]: new ort.Tensor('float32', data, dims) };
  for (let i = 0; i < 2; i++) await s.run(feeds);
  const ts = [];
  for (let i = 0; i < runs; i++) {
    const t0 = process.hrtime.bigint();
    await s.run(feeds);
    ts.push(Number(process.hrtime.bigint() - t0) / 1e6);
  }
  ts.sort((a, b) => a - b);
  console.log(JSON.stringify({ median_ms: ts[Math.floor(ts.length / 2)], version: ort.env.versions.web }));
})();
