"""Serving captions over HTTP: `capjax.serving.create_app` is the ASGI app."""


def create_app(*args, **kwargs):
  """The ASGI app; see `capjax.serving.app.create_app`.

  For `uvicorn 'capjax.serving:create_app' --factory`. The app's module is
  imported here, not with the package, so that importing one submodule
  (capjax.serving.fetch, say) does not import the whole server.
  """
  from capjax.serving import app  # noqa: PLC0415

  return app.create_app(*args, **kwargs)
