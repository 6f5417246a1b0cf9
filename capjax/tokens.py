"""The special tokens and their ids, which every vocabulary shares.

The vocabulary (capjax.data.vocab) puts them first; the searches, the
metrics and the server read the ids from here, so the model needs no
vocabulary to know where a caption starts and ends.
"""

PAD, START, END, UNK = '<pad>', '<start>', '<end>', '<unk>'
SPECIAL_TOKENS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = range(len(SPECIAL_TOKENS))
