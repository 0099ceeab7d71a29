// Load a GGUF written by `snugtune merge --gguf` in llama.cpp (through node-llama-cpp, which ships it
// prebuilt) and chat with the chat template stored in the file.
//   npm install node-llama-cpp && node scripts/llama_cpp_check.mjs MODEL.gguf "Your message"
import {getLlama, LlamaChatSession, resolveChatWrapper} from "node-llama-cpp";
const llama = await getLlama({gpu: false, build: "never"});
const model = await llama.loadModel({modelPath: process.argv[2]});
console.log("loaded:", model.fileInfo.metadata.general.architecture, "tokens", model.tokens.bos, model.tokens.eos);
console.log("template:", (model.fileInfo.metadata.tokenizer.chat_template || "").slice(0, 60));
const context = await model.createContext({contextSize: 1024});
const session = new LlamaChatSession({contextSequence: context.getSequence()});
console.log("chat wrapper:", session.chatWrapper.wrapperName);
const answer = await session.prompt(process.argv[3], {maxTokens: 80, temperature: 0});
console.log("ANSWER:", answer);
