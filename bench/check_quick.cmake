# Runs `lazyfs-bench --quick` and checks that its JSON has a successful
# result for every method x scenario x link it ran, with demand_misses and
# wholly_local_s where they apply. Timing is not checked.
execute_process(
  COMMAND ${BENCH} --quick --json ${JSON} --work-dir ${WORK_DIR}
  RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "lazyfs-bench --quick exited ${rc}")
endif()
file(READ ${JSON} doc)
string(JSON n_results LENGTH "${doc}" results)
string(JSON n_methods LENGTH "${doc}" config methods)
string(JSON n_scenarios LENGTH "${doc}" config scenarios)
string(JSON n_links LENGTH "${doc}" config links)
math(EXPR want "${n_methods} * ${n_scenarios} * ${n_links}")
if(NOT n_methods EQUAL 9 OR NOT n_scenarios EQUAL 4 OR NOT n_results EQUAL want)
  message(FATAL_ERROR "expected 9 methods x 4 scenarios x ${n_links} links, got ${n_results} "
                      "results for ${n_methods} methods and ${n_scenarios} scenarios")
endif()
math(EXPR last "${n_results} - 1")
foreach(i RANGE ${last})
  string(JSON runs GET "${doc}" results ${i} runs)
  string(JSON ready ERROR_VARIABLE missing GET "${doc}" results ${i} restore_ready_s)
  string(JSON bytes ERROR_VARIABLE missing_bytes GET "${doc}" results ${i} bytes_over_link)
  string(JSON what GET "${doc}" results ${i} method)
  string(JSON where GET "${doc}" results ${i} scenario)
  if(runs LESS 1 OR missing OR missing_bytes OR bytes EQUAL 0)
    message(FATAL_ERROR "no result for ${what} on ${where}")
  endif()
  # The lazyfs methods report demand misses; the eager copies and the fills
  # also when they were wholly local (on disk).
  string(JSON misses_type TYPE "${doc}" results ${i} demand_misses)
  string(JSON local_type TYPE "${doc}" results ${i} wholly_local_s)
  if(what MATCHES "^lazyfs")
    set(want_misses NUMBER)
  else()
    set(want_misses NULL)
  endif()
  if(what MATCHES "^lazyfs\\+fill" OR what MATCHES "^eager-")
    set(want_local NUMBER)
  else()
    set(want_local NULL)
  endif()
  if(NOT misses_type STREQUAL want_misses OR NOT local_type STREQUAL want_local)
    message(FATAL_ERROR "${what} on ${where}: demand_misses is ${misses_type} (want "
                        "${want_misses}), wholly_local_s is ${local_type} (want ${want_local})")
  endif()
endforeach()
message(STATUS "lazyfs-bench --quick: ${n_results} results")
