"""`kubectl blockpull`: a kubectl plugin to create, follow, wait for and abort BlockPulls.

Modules, each owning one thing:

* ``main``    -- the console script ``kubectl-blockpull``: the commands and their exit statuses;
* ``args``    -- the command line (kubectl's own connection flags, the subcommands, durations);
* ``config``  -- kubeconfig semantics: ``--kubeconfig``, ``$KUBECONFIG``, ``--context``, the
  context's namespace, in-cluster; API errors turned into one line;
* ``watch``   -- list-then-watch in a thread, resuming from the last resourceVersion after a
  dropped watch and re-listing after ``410 Gone``;
* ``model``   -- pure: what an object's status means (outcome, progress) and the set of
  objects being followed;
* ``render``  -- pure text: live-view rows, plain lines, outcome lines; and the terminal
  screen the live view is drawn on.
"""
