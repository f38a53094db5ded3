"""Chapter 1: architectures. Each module builds one paper's architecture and registers its tiny config with
``recipes.register`` (model ``ch1_<method>``, zoo entries per seed)."""
