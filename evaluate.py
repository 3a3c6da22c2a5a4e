"""`python evaluate.py` in a checkout: the `instdisc-evaluate` command.

Its flags and docs: tf_instdisc/cli/evaluate.py.
"""

from tf_instdisc.cli import evaluate

if __name__ == "__main__":
  evaluate.run()
