// Package crashtest holds the knobs the crash tests share: `make test`
// runs them small, `make crash` (docs/CRASH.md) turns them up through the
// environment without another build.
package crashtest

import (
	"fmt"
	"os"
	"strconv"
)

// Seeds is how many power-cut seeds a format's crash test runs:
// $CRASH_SEEDS when set, else def. A format with several
// configurations shares the count between them (PerConfig).
func Seeds(def int) int { return fromEnv("CRASH_SEEDS", def) }

// Rounds is how many kill rounds of each kind the process-kill matrix
// runs: $CRASH_ROUNDS when set, else def.
func Rounds(def int) int { return fromEnv("CRASH_ROUNDS", def) }

// PerConfig splits Seeds(def) between n configurations, at least one each.
func PerConfig(def, n int) int { return max(1, (Seeds(def)+n-1)/n) }

// fromEnv reads a positive count; a malformed one is a mistake in the
// command line, and running the default instead would hide it.
func fromEnv(name string, def int) int {
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		panic(fmt.Sprintf("%s=%q: want a positive number", name, s))
	}
	return n
}
