"""The chatbot demo: about a thousand simulated conversations on SQLite.

    python -m examples.chatbot --conversations 200

is the same as `casern demo`; the code lives in `casern._demo` so that the demo
also runs from an installed casern, without this repository.
"""

from casern._demo import command

if __name__ == "__main__":
    command(prog_name="python -m examples.chatbot")
