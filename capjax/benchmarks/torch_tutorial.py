"""A PyTorch baseline: the captioner as PyTorch users write it.

As in sgrvinod's "a-PyTorch-Tutorial-to-Image-Captioning": an attention
`nn.Module` and an `nn.GRUCell` called in a Python loop over time steps,
teacher forcing, masked cross-entropy, `torch.optim.Adam`, and the
sort-by-length trick (the batch shrinks as captions end). The equations are
capjax's default decoder's (the GRU state carried), so `from_capjax_params`
makes it compute capjax's numbers (tests/test_torch_baseline.py). Unlike
sgrvinod's, it applies W1 once per image and fc1, fc2 once to all steps'
states, as capjax does: both do the work capjax.benchmarks.flops counts, and
the comparison is of the frameworks, not of the algorithms.

  trainer = torch_tutorial.TorchTrainer(compile=False)
  loss = trainer(features_BLD, tokens_BT)
  tokens_BT = torch_tutorial.greedy_captions(trainer.model, features_BLD, 32)

Nothing here imports TensorFlow or a config: it runs where only JAX and
PyTorch are installed.
"""

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from capjax.benchmarks import workload
from capjax.data import vocab as vocab_lib

Tensor = torch.Tensor
_Result = TypeVar('_Result')

PAD, START, END = (
  vocab_lib.Vocab.pad_id,
  vocab_lib.Vocab.start_id,
  vocab_lib.Vocab.end_id,
)


def default_device() -> torch.device:
  """CUDA when PyTorch sees a GPU, else the CPU."""
  return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


class Attention(nn.Module):
  """Bahdanau attention: `a = softmax(V tanh(W1 x + W2 h))` over positions."""

  def __init__(self, embedding_dim: int, units: int):
    super().__init__()
    self.W1 = nn.Linear(embedding_dim, units)
    self.W2 = nn.Linear(units, units)
    # No bias, as in capjax: softmax ignores a shift shared by all positions.
    self.V = nn.Linear(units, 1, bias=False)

  def forward(
    self, values_BLE: Tensor, keys_BLU: Tensor, h_BU: Tensor
  ) -> tuple[Tensor, Tensor]:
    """Context (B, E) and weights (B, L); keys_BLU is W1(values_BLE)."""
    score_BL = self.V(torch.tanh(keys_BLU + self.W2(h_BU)[:, None]))[..., 0]
    attention_BL = torch.softmax(score_BL, dim=1)
    context_BE = (values_BLE * attention_BL[..., None]).sum(dim=1)
    return context_BE, attention_BL


class DecoderCell(nn.Module):
  """Attend with query h, then `GRUCell([context; token], h)`: compilable."""

  def __init__(self, embedding_dim: int, units: int):
    super().__init__()
    self.attention = Attention(embedding_dim, units)
    # PyTorch's GRUCell has Keras' reset_after=True semantics: r multiplies
    # (W_hn h + b_hn), and every gate has its own recurrent bias.
    self.gru = nn.GRUCell(2 * embedding_dim, units)

  def forward(
    self,
    values_BLE: Tensor,
    keys_BLU: Tensor,
    h_BU: Tensor,
    embedded_BE: Tensor,
  ) -> tuple[Tensor, Tensor]:
    """The new state (B, U) and the attention weights (B, L)."""
    context_BE, attention_BL = self.attention(values_BLE, keys_BLU, h_BU)
    h_BU = self.gru(torch.cat([context_BE, embedded_BE], dim=1), h_BU)
    return h_BU, attention_BL


class TorchCaptioner(nn.Module):
  """capjax's default Captioner (the GRU state carried) in PyTorch."""

  def __init__(
    self, vocab_size: int, embedding_dim: int, units: int, feature_dim: int
  ):
    super().__init__()
    self.encoder = nn.Linear(feature_dim, embedding_dim)
    self.embedding = nn.Embedding(vocab_size, embedding_dim)
    self.cell = DecoderCell(embedding_dim, units)
    self.fc1 = nn.Linear(units, units)
    self.fc2 = nn.Linear(units, vocab_size)

  def encode(self, features_BLD: Tensor) -> tuple[Tensor, Tensor]:
    """Encoder outputs and attention keys W1 x, once per image."""
    values_BLE = torch.relu(self.encoder(features_BLD))
    return values_BLE, self.cell.attention.W1(values_BLE)

  def head(self, h_xU: Tensor) -> Tensor:
    """fc2(fc1(h)), no activation between, as in capjax and the tutorial."""
    return self.fc2(self.fc1(h_xU))

  def forward(
    self,
    features_BLD: Tensor,
    tokens_BT: Tensor,
    batch_sizes: Sequence[int] | None = None,
  ) -> Tensor:
    """Teacher forcing from the zero state, predicting tokens[:, 1:].

    Returns logits (B, T-1, V); with batch_sizes (rows sorted by decreasing
    length), step t runs the first batch_sizes[t] rows only, and the logits
    of those, (sum(batch_sizes), V), are packed time-major as
    `pack_padded_sequence` packs the targets.
    """
    values_BLE, keys_BLU = self.encode(features_BLD)
    embedded_BTE = self.embedding(tokens_BT)
    h_BU = values_BLE.new_zeros(len(tokens_BT), self.cell.gru.hidden_size)
    states = []
    for t, live in enumerate(
      batch_sizes or [len(tokens_BT)] * (tokens_BT.shape[1] - 1)
    ):
      # Rows sorted by decreasing length: slicing drops the finished ones.
      h_BU, _ = self.cell(
        values_BLE[:live], keys_BLU[:live], h_BU[:live], embedded_BTE[:live, t]
      )
      states.append(h_BU)
    if batch_sizes:
      return self.head(torch.cat(states))
    return self.head(torch.stack(states, dim=1))


def from_capjax_params(params: Any) -> TorchCaptioner:
  """A TorchCaptioner holding the parameters of a capjax Captioner exactly.

  Flax kernels are (in, out) and PyTorch weights (out, in): each is
  transposed. capjax orders the GRU's gates (z, r, n) and splits its input
  kernel by rows into context and token halves; PyTorch's GRUCell orders
  them (r, z, n), in one weight_ih over the input [context; token].
  """
  p = jax.tree_util.tree_map(
    lambda x: torch.from_numpy(np.array(x, np.float32)), params
  )

  def r_z_n(x_x3U):
    z, r, n = x_x3U.chunk(3, dim=-1)
    return torch.cat([r, z, n], dim=-1)

  def linear(name, dense):
    bias = {f'{name}.bias': dense['bias']} if 'bias' in dense else {}
    return {f'{name}.weight': dense['kernel'].T, **bias}

  gru = p['gru']
  vocab_size, embedding_dim = p['embedding']['embedding'].shape
  model = TorchCaptioner(
    vocab_size,
    embedding_dim,
    units=gru['recurrent_kernel'].shape[0],
    feature_dim=p['encoder']['fc']['kernel'].shape[0],
  )
  input_kernel = torch.cat([gru['context_kernel'], gru['token_kernel']])
  # Strict: every PyTorch parameter is set, each from one capjax parameter.
  model.load_state_dict(
    {
      **linear('encoder', p['encoder']['fc']),
      'embedding.weight': p['embedding']['embedding'],
      **linear('cell.attention.W1', p['attention']['W1']),
      **linear('cell.attention.W2', p['attention']['W2']),
      **linear('cell.attention.V', p['attention']['V']),
      'cell.gru.weight_ih': r_z_n(input_kernel).T,
      'cell.gru.weight_hh': r_z_n(gru['recurrent_kernel']).T,
      'cell.gru.bias_ih': r_z_n(gru['input_bias']),
      'cell.gru.bias_hh': r_z_n(gru['recurrent_bias']),
      **linear('fc1', p['fc1']),
      **linear('fc2', p['fc2']),
    }
  )
  return model


def caption_loss(logits_xV: Tensor, targets_x: Tensor) -> Tensor:
  """capjax's objective: cross-entropy summed over real targets / their count.

  Logits (..., V) and targets (...) of any matching leading shape, padded
  (B, T-1) or packed (N,); <pad> targets count for nothing.
  """
  loss_sum = F.cross_entropy(
    logits_xV.flatten(0, -2),
    targets_x.flatten(),
    ignore_index=PAD,
    reduction='sum',
  )
  return loss_sum / (targets_x != PAD).sum().clamp(min=1)


def sorted_caption_loss(
  model: TorchCaptioner,
  features_BLD: Tensor,
  tokens_BT: Tensor,
  lengths_B: Tensor,
) -> Tensor:
  """`caption_loss` computed sgrvinod's way: sorted by length, live rows only.

  lengths_B counts each caption's tokens, <start> and <end> included.
  """
  lengths_B, order_B = lengths_B.cpu().sort(descending=True)
  order_B = order_B.to(tokens_BT.device)
  features_BLD, tokens_BT = features_BLD[order_B], tokens_BT[order_B]
  # A caption of n tokens makes n - 1 predictions, <end> the last target.
  packed = nn.utils.rnn.pack_padded_sequence(
    tokens_BT[:, 1:], lengths_B - 1, batch_first=True
  )
  logits_NV = model(features_BLD, tokens_BT, packed.batch_sizes.tolist())
  return caption_loss(logits_NV, packed.data)


def compile_cell(model: TorchCaptioner) -> None:
  """Compiles the model's `DecoderCell` in place, with dynamic shapes."""
  # DecoderCell.forward's compiled entries are shared by every model: each
  # model, dtype and grad mode, and the batch of 1 (which dynamic shapes
  # still specialise), adds one. Past the default limit of 8, PyTorch runs
  # the rest eagerly without a word, and "compiled" figures would be eager.
  dynamo = torch._dynamo  # noqa: SLF001
  dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
  model.cell.compile(dynamic=True)


class TorchTrainer:
  """One `torch.optim.Adam` step (Keras' defaults, as capjax's) per call.

  The model holds capjax's params if given, else PyTorch's initialisation.
  compile=True compiles `DecoderCell` (forward and backward) once, with
  dynamic shapes, for all steps, lengths and the sort trick's shrinking
  batches; compiling the whole unrolled loop recompiles per length and per
  length profile (86 s for T=32 on a 2-core CPU, for a step about 7% faster).
  Compilation happens, or fails, at the first call. dtype=torch.bfloat16
  trains under `torch.autocast`, the parameters in float32 (as capjax's
  dtype option).
  """

  def __init__(
    self,
    compile: bool,  # noqa: A002
    params: Any = None,
    sizes: workload.Sizes = workload.TUTORIAL,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
  ):
    self.device = device or default_device()
    model = (
      TorchCaptioner(
        sizes.vocab_size, sizes.embedding_dim, sizes.units, sizes.feature_dim
      )
      if params is None
      else from_capjax_params(params)
    )
    self.model = model.to(self.device)
    if compile:
      compile_cell(self.model)
    self._autocast = torch.autocast(
      self.device.type, dtype=dtype, enabled=dtype != torch.float32
    )
    self.optimizer = torch.optim.Adam(
      self.model.parameters(),
      lr=workload.LEARNING_RATE,
      betas=(workload.ADAM_B1, workload.ADAM_B2),
      eps=workload.ADAM_EPS,
    )

  def __call__(
    self,
    features_BLD: Tensor,
    tokens_BT: Tensor,
    lengths_B: Tensor | None = None,
  ) -> Tensor:
    """Steps on a batch and returns its loss; lengths_B (tokens per caption)
    selects the sort-by-length trick."""
    self.optimizer.zero_grad()
    with self._autocast:
      if lengths_B is None:
        loss = caption_loss(
          self.model(features_BLD, tokens_BT), tokens_BT[:, 1:]
        )
      else:
        loss = sorted_caption_loss(
          self.model, features_BLD, tokens_BT, lengths_B
        )
    loss.backward()
    self.optimizer.step()
    return loss.detach()


def synchronized(
  fn: Callable[[], _Result], device: torch.device
) -> Callable[[], _Result]:
  """fn, returning only once the device has finished its work: timers (and
  capjax.benchmarks.harness) cannot wait for PyTorch's CUDA queue."""
  if device.type != 'cuda':
    return fn

  def run():
    result = fn()
    torch.cuda.synchronize(device)
    return result

  return run


@torch.inference_mode()
def greedy_captions(
  model: TorchCaptioner, features_BLD: Tensor, max_len: int
) -> Tensor:
  """Greedy decoding the PyTorch way: a Python loop over tokens, argmax each.

  As capjax's greedy search: <pad> and <start> are never chosen, positions
  after a caption's <end> hold <pad>, and the loop stops once every caption
  has ended or after max_len tokens. Returns tokens (B, max_len).
  """
  values_BLE, keys_BLU = model.encode(features_BLD)
  batch_size, device = len(features_BLD), features_BLD.device
  h_BU = values_BLE.new_zeros(batch_size, model.cell.gru.hidden_size)
  token_B = torch.full((batch_size,), START, device=device)
  done_B = torch.zeros(batch_size, dtype=torch.bool, device=device)
  tokens_BT = torch.full((batch_size, max_len), PAD, device=device)
  for t in range(max_len):
    h_BU, _ = model.cell(values_BLE, keys_BLU, h_BU, model.embedding(token_B))
    logits_BV = model.head(h_BU)
    logits_BV[:, [PAD, START]] = -torch.inf
    token_B = logits_BV.argmax(dim=1).masked_fill(done_B, PAD)
    tokens_BT[:, t] = token_B
    done_B |= token_B == END
    # A read back to the host every step: how such loops decide to stop.
    if done_B.all():
      break
  return tokens_BT
