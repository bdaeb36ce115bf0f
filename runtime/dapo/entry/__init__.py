"""Ways of launching: in-process (`dapo run`), local processes, pod roles (`dapo role`)."""
