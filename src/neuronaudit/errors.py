"""The one exception type users see: a one-line message naming the bad value."""


class NeuronAuditError(Exception):
    """Bad input (config, prompt file, model path, architecture, dose).

    The CLI prints ``neuronaudit: error: <message>`` and exits with status 2, so the message must
    be a single line that names the offending value.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
