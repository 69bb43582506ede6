"""What the pages share, one module per concern: the page frame (frame), text for markdown (text),
charts (charts), process-wide resources (resources), the visitor (visitor), the bank (bank),
runs and their live panels (runs), combining phi into one (combining), the exercise-link engine of teachers' links (exercise, which
the Train page imports itself). UI glue only: the torch work lives in peftcore, the run
service in peftcore.service. The pages call `ui.<name>`; this file names what they may use.

One base per device and one run manager per server process (st.cache_resource), shared by every
session. A session's bank of phi and the ids of its runs live in st.session_state; the runs
themselves live in the manager, so a rerun or a page switch never loses one."""
from .frame import (PAGE_FRAME, PANEL_FAILED, log, low_rank_view, method_views, page_frame, panel, run_view, ss, view_named, view_of)  # noqa: F401
from .text import (MARKDOWN_SPECIAL, PLAIN_WORDS, as_text, fmt_num, link_value, literal, plain, predictions_table, serving_metrics, start_sentence, storage_sentence)  # noqa: F401
from .charts import (FONT, GRID, LAYOUT, PEFT_COLOR, even_ticks, figure, log_ticks, plot)  # noqa: F401
from .resources import (BASES, MAX_SESSION_RUNS, PER_ADDRESS_DEFAULT, PER_ADDRESS_ENV, attention_spread, available_devices, base_facts, base_fingerprint, base_skills, client, device, get_base, get_manager, get_random_base, get_store, make_manager, per_address_cap, run_address, seed, store, store_path)  # noqa: F401
from .visitor import (BANK_COOKIE, COOKIE_YEAR_S, OWNER_COOKIE, bank_offer, bank_token, become_teacher, clear_cookie, connected, follow_visitor, forget_class, identify, leave_teacher, owner, private_bank_link, read_bank_link, send_cookies, sessions_of_owner, set_cookie, teacher_cookie, teacher_handle, use_bank)  # noqa: F401
from .bank import (add_to_bank, bank, bank_names, bank_rows, delete_my_phi, file_bytes, library_names, remove_from_bank, unique_name)  # noqa: F401
from .runs import (MAX_POINTS, MAX_POLL_S, PATIENCE_STEPS, POLL_S, POLL_S_PER_PAGE, WAITING_POLL_S, active_session_runs, eval_every, group_runs, hidden, last_eval, live_figure, live_runs, open_pages, owns, poll_interval, progress_line, run_cache, run_summary, runs_figure, start_group, stop_group, stop_session_runs, stopped_improving)  # noqa: F401
from . import combining  # noqa: F401 - many phi become one: its controls and results
from peftcore.service.store import CODE_ALPHABET, CODE_LEN, StoreError, normalize_code  # noqa: F401 - the pages catch and use these
