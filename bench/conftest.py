# `pytest bench` collects the microbenchmarks only: the scripts beside them run as programs
# (host_overhead.py stubs out the Triton launches, which must never happen in a test process).
collect_ignore = ["host_overhead.py", "readme_section.py", "cpu_backend.py", "gpu_check.sh"]
