"""Quick start: M+ built on a pretrained Llama (SmolLM2-135M-Instruct by default), text in and text out.

    python examples/quick_start.py [--model PATH_OR_ID] [--gguf-file FILE]

It builds an M+ from the base model (``MPlusForCausalLM.from_base``: the base's weights, LoRA adapters at zero, a
fresh memory), writes a document into its memory (``inject``), and answers a question about it, streaming the answer
(``generate`` with a ``TextStreamer``). An M+ built this way has not been trained to read its memory yet (see
examples/train_from_base.py): the answer comes from the prompt and the base model; the memory bypass shows what the
base model alone says.
"""

from __future__ import annotations

import torch
from _common import SMALL, arguments, base_model
from transformers import TextStreamer

from mplus import MPlusForCausalLM, load_tokenizer

DOCUMENT = (
    "The Lighthouse of Alexandria was built in the third century BC on the island of Pharos. It stood over one "
    "hundred metres tall and guided ships into the harbour for more than a thousand years, until earthquakes "
    "destroyed it in the fourteenth century."
)
QUESTION = "Where was the Lighthouse of Alexandria built?"


def main() -> None:
    args = arguments(__doc__.splitlines()[0]).parse_args()
    path, gguf = base_model(args)
    tokenizer = load_tokenizer(path, gguf_file=gguf)
    model = MPlusForCausalLM.from_base(path, gguf_file=gguf, kind="mplus", max_length=512, **SMALL)
    context = tokenizer(DOCUMENT, add_special_tokens=False, return_tensors="pt").input_ids
    model.inject(context)  # the document, in memory
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    answers = {}
    for use_memory in (False, True):  # the base model alone, then through the memory
        model.use_memory = use_memory
        print(f"Q: {QUESTION}\nA ({'through the memory' if use_memory else 'memory bypassed: the base model'}): ",
              end="", flush=True)  # fmt: skip
        with torch.inference_mode():
            out = model.generate(prompt, max_new_tokens=24, do_sample=False, streamer=streamer)
        answers[use_memory] = tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
    print(f"(memory version {model.memory_version}: the document is in memory; an untrained M+ does not read it yet)")
    assert answers[False].strip(), "the base model answered nothing"

if __name__ == "__main__":
    main()
