// effc's wasm32 artifact (model.wasm: effc's executor and TVM's kernels, a WASI command) under
// node's WASI, so it runs in the same JavaScript engine (V8) as the web engines it is compared
// with (tools/bench/tvm_wasm.py --node-wasi). Compiled by V8's optimizing tier up front
// (node --no-liftoff), as a warm page would run it.
//   node --no-liftoff wasi_run.mjs MODEL.wasm ARTIFACT_DIR IO_DIR REPEAT
// The executor reads IO_DIR/in<i>.bin, writes IO_DIR/out<i>.bin and prints its timing line.
import { readFileSync } from 'node:fs';
import { WASI } from 'node:wasi';

const [wasm, art, io, repeat] = process.argv.slice(2);
const wasi = new WASI({
  version: 'preview1',
  args: ['model.wasm', '/a', '/io', repeat],
  preopens: { '/a': art, '/io': io },
  returnOnExit: true,
});
const module = await WebAssembly.compile(readFileSync(wasm));
const instance = await WebAssembly.instantiate(module, wasi.getImportObject());
process.exit(wasi.start(instance));
