"""Korean attention seq2seq chatbot: corpus -> tokenizer -> RNN encoder-decoder -> replies with attention."""

__version__ = "0.1.0"
