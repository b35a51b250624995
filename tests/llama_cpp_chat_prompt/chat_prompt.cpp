// llama.cpp's chat prompt for a GGUF file, as llama-server builds it: argv[1] the GGUF, stdin the OpenAI messages as
// JSON. Prints the token ids (one line, spaces between) and then the rendered prompt.
#include "chat.h"
#include "common.h"
#include "json.h"
#include "llama.h"
#include <cstdio>
#include <iostream>
#include <iterator>

int main(int argc, char ** argv) {
    if (argc != 2) { fprintf(stderr, "usage: chat_prompt MODEL.gguf < messages.json\n"); return 2; }
    std::string input((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    llama_log_set([](ggml_log_level, const char *, void *) {}, nullptr);
    llama_backend_init();
    llama_model_params model_params = llama_model_default_params();
    model_params.vocab_only = true;
    llama_model * model = llama_model_load_from_file(argv[1], model_params);
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    auto templates = common_chat_templates_init(model, "");
    common_chat_templates_inputs inputs;
    inputs.messages = common_chat_msgs_parse_oaicompat(common_json::parse(input));
    inputs.add_generation_prompt = true;
    inputs.use_jinja = true;
    common_chat_params params = common_chat_templates_apply(templates.get(), inputs);
    // llama-server's tokenization of a chat prompt: special tokens parsed, BOS added where the vocabulary says
    for (llama_token id : common_tokenize(llama_model_get_vocab(model), params.prompt, true, true)) printf("%d ", id);
    printf("\n%s", params.prompt.c_str());
    llama_model_free(model);
    return 0;
}
