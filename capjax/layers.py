"""Which capjax modules each module may import: the layers, as data.

`MAY_IMPORT[module]` lists what `module` may import of capjax, at any depth
of its code, function-local imports included. Names are relative to
`capjax`; a package's name allows the package and every module in it. A
key ending in `.*` gives every module of a package one rule.

docs/design.md's module map shows these rules in its "may import" column,
and tests/test_architecture.py holds the code to them and the doc to the
table. The rules themselves form no cycle, so they describe layers: shared
modules, then the model, the data, the metrics, training, and using or
importing a trained model; programs on top.
"""

# A program may import any library module, but no other program.
LIBRARIES = 'any library'
# Benchmarks and test helpers sit outside the layers.
ANYTHING = 'anything'

PROGRAMS = (
  'train',
  'sample',
  'evaluate',
  'serve',
  'convert',
  'features',
  'export',
)

MAY_IMPORT: dict[str, tuple[str, ...] | str] = {
  # Programs.
  **{program: LIBRARIES for program in PROGRAMS},
  # Shared.
  '__init__': (),  # capjax/__init__.py
  'programs': ('console', 'errors'),
  'console': (),
  'errors': (),
  'tokens': (),
  'files': ('errors',),
  'configs': (),
  'configs.default': (),
  'config_checks': ('errors', 'configs.default'),
  'workdir': ('config_checks', 'errors', 'files'),
  'plots': (),
  'layers': (),
  # The model: JAX only, no file formats but Keras' InceptionV3 weights.
  'model': (),
  'model.captioner': ('model.recurrence',),
  'model.recurrence': (),
  'model.losses': (),
  'model.search': ('tokens',),
  'model.decoding': ('model.captioner', 'model.recurrence', 'model.search'),
  'model.inception': (),
  'model.keras_inception': ('model.inception',),
  # The data.
  'data': (),
  'data.datasets': ('config_checks', 'data.shapes', 'errors', 'files'),
  'data.shapes': ('config_checks', 'files'),
  'data.vocab': ('errors', 'files', 'tokens'),
  'data.images': ('errors',),
  'data.extractors': (
    'config_checks',
    'data.images',
    'errors',
    'model.inception',
    'model.keras_inception',
  ),
  'data.feature_store': ('config_checks', 'data.datasets', 'errors', 'files'),
  'data.extraction': (
    'config_checks',
    'data.datasets',
    'data.extractors',
    'data.feature_store',
    'data.images',
    'errors',
  ),
  'data.schedule': ('errors',),
  'data.input_pipeline': (
    'data.datasets',
    'data.feature_store',
    'data.schedule',
    'data.vocab',
  ),
  'data.reference_batches': (
    'data.feature_store',
    'data.input_pipeline',
    'data.schedule',
    'errors',
  ),
  # Metrics, and captions of a feature store scored with them.
  'metrics': (),
  'metrics.coco': ('console', 'data.vocab'),
  'metrics.cider': ('tokens',),
  'metrics.bootstrap': ('metrics.coco',),
  'captioning': (
    'data.datasets',
    'data.feature_store',
    'data.vocab',
    'metrics.bootstrap',
    'metrics.coco',
    'model.captioner',
    'model.decoding',
  ),
  # Training.
  'training': (),
  'training.state': ('errors', 'model.captioner'),
  'training.step': ('model.captioner', 'model.losses', 'training.state'),
  'training.scst': (
    'data.vocab',
    'metrics.cider',
    'model.captioner',
    'model.decoding',
    'model.search',
    'training.state',
  ),
  'training.init_from': (
    'data.feature_store',
    'data.vocab',
    'errors',
    'files',
    'training.checkpoints',
    'workdir',
  ),
  'training.parallel': ('data.schedule', 'errors'),
  'training.damage': (),
  'training.orbax_logs': (),
  'training.checkpoints': (
    'errors',
    'training.damage',
    'training.orbax_logs',
    'workdir',
  ),
  'training.preemption': (),
  'training.best': (
    'config_checks',
    'files',
    'training.checkpoints',
    'training.parallel',
    'training.damage',
  ),
  'training.reporting': (),
  'training.validation': (
    'captioning',
    'data',
    'errors',
    'model',
    'training.parallel',
    'training.step',
  ),
  'training.device_data': ('errors', 'training.parallel'),
  'training.objectives': (
    'data.input_pipeline',
    'data.reference_batches',
    'errors',
    'metrics.cider',
    'model.losses',
    'training.device_data',
    'training.parallel',
    'training.scst',
    'training.step',
  ),
  'training.dispatch': ('training.objectives', 'training.parallel'),
  'training.loop': (
    'config_checks',
    'data',
    'errors',
    'files',
    'metrics.cider',
    'model',
    'training',
    'workdir',
  ),
  # Using a trained model.
  'inference': (
    'data.extractors',
    'data.feature_store',
    'data.images',
    'data.vocab',
    'errors',
    'files',
    'model',
    'training.checkpoints',
    'training.state',
    'workdir',
  ),
  'evaluation': (
    'captioning',
    'data',
    'errors',
    'inference',
    'metrics.bootstrap',
    'metrics.coco',
    'model.decoding',
    'workdir',
  ),
  'serving': ('serving.app',),
  'serving.requests': (),
  'serving.bodies': ('serving.requests',),
  'serving.imaging': ('data.images', 'serving.requests'),
  'serving.continuous': ('model', 'tokens'),
  'serving.batcher': ('serving.metrics', 'serving.requests'),
  'serving.fetch': ('serving.requests',),
  'serving.metrics': (),
  'serving.service': (
    'data.extractors',
    'data.images',
    'inference',
    'model.decoding',
    'plots',
    'serving.batcher',
    'serving.continuous',
    'serving.fetch',
    'serving.imaging',
    'serving.metrics',
    'serving.requests',
  ),
  'serving.app': (
    'errors',
    'inference',
    'serving.bodies',
    'serving.metrics',
    'serving.requests',
    'serving.service',
  ),
  'serving.limits': (),
  'serving.protocol': ('serving.bodies', 'serving.limits', 'serving.metrics'),
  'serving.server': ('serving.app', 'serving.limits', 'serving.protocol'),
  # Exporting a trained model: ONNX and SavedModel artifacts.
  'exporting': (),
  'exporting.extractor': (
    'data.extractors',
    'errors',
    'model.inception',
    'model.keras_inception',
  ),
  'exporting.graph': (
    'errors',
    'exporting.extractor',
    'model.captioner',
    'model.decoding',
  ),
  'exporting.onnx_format': ('errors',),
  'exporting.saved_model': ('data.vocab', 'exporting.graph'),
  'exporting.metadata': (
    '__init__',
    'data.vocab',
    'exporting.graph',
    'files',
    'inference',
  ),
  'exporting.artifact': (
    'errors',
    'exporting.extractor',
    'exporting.graph',
    'exporting.metadata',
    'exporting.onnx_format',
    'exporting.saved_model',
    'inference',
    'model.decoding',
  ),
  # Importing a tutorial model: it writes a workdir, with a checkpoint.
  'porting': (),
  'porting.tutorial_weights': ('errors',),
  'porting.tutorial_vocab': ('data.vocab', 'errors', 'files'),
  'porting.tf_checkpoint': ('errors', 'porting.tutorial_weights'),
  'porting.tutorial_workdir': (
    'data.vocab',
    'errors',
    'model.captioner',
    'porting.tf_checkpoint',
    'porting.tutorial_vocab',
    'porting.tutorial_weights',
    'training.checkpoints',
    'training.state',
    'workdir',
  ),
  # Outside the layers.
  'benchmarks.*': ANYTHING,
  'testing.*': ANYTHING,
}


def rule(module: str) -> tuple[str, ...] | str | None:
  """`module`'s entry (relative to capjax), or None where it has none."""
  if module in MAY_IMPORT:
    return MAY_IMPORT[module]
  # A package's `.*` rule covers its __init__ (module) and its modules.
  for package in (module, module.rpartition('.')[0]):
    if f'{package}.*' in MAY_IMPORT:
      return MAY_IMPORT[f'{package}.*']
  return None


def allows(allowed: tuple[str, ...] | str, imported: str) -> bool:
  """Whether a rule allows importing `imported` (relative to capjax)."""
  if allowed == ANYTHING:
    return True
  if allowed == LIBRARIES:
    return imported not in PROGRAMS and rule(imported) != ANYTHING
  return any(imported == a or imported.startswith(f'{a}.') for a in allowed)
