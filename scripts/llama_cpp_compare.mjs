// llama.cpp (through node-llama-cpp's prebuilt binaries) on a GGUF written by snugtune: how it tokenizes
// some texts, and its next-token probabilities after a given token sequence. Prints one JSON object.
//   node scripts/llama_cpp_compare.mjs MODEL.gguf '{"texts": ["..."], "prompt": [1, 2, 3]}'
import {getLlama} from "node-llama-cpp";
const [modelPath, request] = [process.argv[2], JSON.parse(process.argv[3])];
const llama = await getLlama({gpu: false, build: "never"});
const model = await llama.loadModel({modelPath});
const tokenized = {};
for (const text of request.texts) tokenized[text] = Array.from(model.tokenize(text));
const context = await model.createContext({contextSize: 512});
const sequence = context.getSequence();
const first = await sequence.evaluateWithMetadata(request.prompt, {probabilities: true}, {temperature: 0}).next();
const top = [...first.value.probabilities.entries()].slice(0, 10);
console.log(JSON.stringify({tokenized, bos: model.tokens.bos, top}));
