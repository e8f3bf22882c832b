"""Serve the demo for the streaming benchmark: checkpoints/default, sampling defaults (T 1.5, max_len 80)."""
import dataclasses, sys
sys.path.insert(0, ".")
import torch
from chatbot import search
for name, value in (("strategy", "sample"), ("max_len", 80), ("temperature", 1.5)):
    search.OPTIONS[name] = dataclasses.replace(search.OPTIONS[name], default=value)
from chatbot.demo import build_demo, launch
from chatbot.inference import ChatBot
torch.manual_seed(int(sys.argv[2]))
bot = ChatBot.from_checkpoint("checkpoints/default", device="cpu")
launch(build_demo({"default": bot}), server_port=int(sys.argv[1]), quiet=True)
