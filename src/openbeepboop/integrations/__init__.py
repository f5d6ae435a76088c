"""Integrations with other libraries, each behind its own extra and imported only when
asked for (`openbeepboop.integrations.dspy` needs `pip install 'openbeepboop[dspy]'`)."""
