// Run a TF.js graph model in pure JavaScript (tfjs-core + tfjs-backend-cpu + tfjs-converter,
// no native code) on float32 NHWC inputs; write the named output node as float32.
// Used by scripts/parity_fixtures.py:
//   NODE_PATH=DIR/node_modules node parity_tfjs.cjs MODEL.json IN.f32 N H W C NODE OUT.f32
const tf = require('@tensorflow/tfjs-core');
require('@tensorflow/tfjs-backend-cpu');
const tfconv = require('@tensorflow/tfjs-converter');
const fs = require('fs');
const path = require('path');

async function main() {
  const [modelJson, inputFile, n, h, w, c, node, outFile] = process.argv.slice(2);
  const mj = JSON.parse(fs.readFileSync(modelJson, 'utf8'));
  const dir = path.dirname(modelJson);
  const specs = [], parts = [];
  for (const group of mj.weightsManifest) {
    for (const p of group.paths) parts.push(fs.readFileSync(path.join(dir, p)));
    specs.push(...group.weights);
  }
  const data = Buffer.concat(parts);
  const handler = {load: async () => ({
    modelTopology: mj.modelTopology, weightSpecs: specs, format: mj.format, generatedBy: mj.generatedBy,
    convertedBy: mj.convertedBy, signature: mj.signature, userDefinedMetadata: mj.userDefinedMetadata,
    weightData: data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength)})};
  await tf.setBackend('cpu');
  const model = await tfconv.loadGraphModel(handler);
  const raw = fs.readFileSync(inputFile);
  const x = tf.tensor4d(new Float32Array(raw.buffer, raw.byteOffset, raw.byteLength / 4), [+n, +h, +w, +c]);
  const y = model.execute(x, node);
  const out = await y.data();
  fs.writeFileSync(outFile, Buffer.from(out.buffer, out.byteOffset, out.byteLength));
  console.log(`tfjs ${tf.version_core}: ${node} ${y.shape.join('x')}`);
}
main().catch((e) => { console.error(e.stack || String(e)); process.exit(1); });
