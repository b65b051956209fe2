"""What every layer of the project shares, importing nothing heavier than the standard library:
the errors a user can fix (`core.errors`), the command-line conventions (`core.cli`), the
choices and size rules a configuration is checked against (`core.choices`), the networks'
input normalisation (`core.normalization`) and the path checks of a student folder
(`core.student_folder`).

`data/`, `modeling/`, `losses/` and `trainer/` all import from here, never the other way round;
and because nothing here loads torch, a configuration mistake or `--help` answers at once."""
