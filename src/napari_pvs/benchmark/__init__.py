"""Product benchmarks that exercise the whole loop (no Qt): labelling efficiency of the
annotation queue (:mod:`.active_learning`) and the shifted data it runs on (:mod:`.data`)."""
