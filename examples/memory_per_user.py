"""One memory per user: one model, many memory states, each user's documents in their own state.

    python examples/memory_per_user.py [--model PATH_OR_ID] [--gguf-file FILE] [--out DIR]

Each user gets a ``MemoryState`` (``model.new_memory``): injections into one never touch another, generation names the
state it reads (``memory=state``), a batch can mix users (``memory=[state_a, state_b]``: each row reads its own), and
each state saves to and loads from its own file (``state.save`` / ``MemoryState.load``) — what a server keeps per user.
"""

from __future__ import annotations

import os
import tempfile

import torch
from _common import SMALL, arguments, base_model

from mplus import MemoryState, MPlusForCausalLM, load_tokenizer

USERS = {
    "ada": "Ada keeps bees on the roof of her flat in Leeds and sells the honey at the Saturday market.",
    "bo": "Bo restores old sailing boats in a shed near Kiel; the current one is a wooden dinghy from 1952.",
}


def main() -> None:
    p = arguments(__doc__.splitlines()[0])
    p.add_argument("--out", help="where the users' memory files go (default: a temporary folder)")
    args = p.parse_args()
    path, gguf = base_model(args)
    tokenizer = load_tokenizer(path, gguf_file=gguf)
    model = MPlusForCausalLM.from_base(path, gguf_file=gguf, kind="mplus", max_length=512, **SMALL)
    states = {}
    for seed, (user, text) in enumerate(USERS.items()):
        states[user] = model.new_memory(seed=seed)  # a copy of the fresh memory, with its own drop generator
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        model.inject(ids, memory=states[user])
    untouched = model.memory_version  # the model's own memory was not written
    prompt = tokenizer("Tell me about my hobby.", return_tensors="pt").input_ids
    with torch.inference_mode():
        alone = {u: model.generate(prompt, memory=s, max_new_tokens=12, do_sample=False) for u, s in states.items()}
        batch = prompt.repeat(2, 1)
        both = model.generate(batch, attention_mask=torch.ones_like(batch), memory=list(states.values()),
                              max_new_tokens=12, do_sample=False)  # fmt: skip
    for row, user in enumerate(states):
        assert torch.equal(both[row], alone[user][0]), f"{user}: the mixed batch must give what the user's run gives"
        print(f"{user}: {tokenizer.decode(alone[user][0, prompt.shape[1]:], skip_special_tokens=True)!r}")
    out = args.out or tempfile.mkdtemp(prefix="mplus-users-")
    for user, state in states.items():
        file = os.path.join(out, f"{user}.safetensors")
        state.save(file)
        again = MemoryState.load(file)
        with torch.inference_mode():
            same = model.generate(prompt, memory=again, max_new_tokens=12, do_sample=False)
        assert torch.equal(same, alone[user]), f"{user}: a reloaded memory must answer as before"
        print(f"{user}: memory saved to {file} ({os.path.getsize(file) / 2**20:.1f} MiB), reloaded: same answer")
    assert model.memory_version == untouched


if __name__ == "__main__":
    main()
