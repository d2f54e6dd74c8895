package crashtest

import "testing"

func TestCounts(t *testing.T) {
	t.Setenv("CRASH_SEEDS", "")
	t.Setenv("CRASH_ROUNDS", "")
	if Seeds(40) != 40 || Rounds(3) != 3 || PerConfig(64, 8) != 8 {
		t.Fatal("defaults not kept without the environment")
	}
	t.Setenv("CRASH_SEEDS", "1000")
	t.Setenv("CRASH_ROUNDS", "5")
	if Seeds(40) != 1000 || Rounds(3) != 5 {
		t.Fatal("environment not read")
	}
	// Shared between configurations, rounded up so none gets fewer.
	if got := PerConfig(64, 8); got != 125 {
		t.Fatalf("PerConfig(_, 8) with 1000 seeds = %d, want 125", got)
	}
	if got := PerConfig(64, 3); got != 334 {
		t.Fatalf("PerConfig(_, 3) with 1000 seeds = %d, want 334", got)
	}
}

func TestBadCountRefused(t *testing.T) {
	for _, v := range []string{"0", "-2", "ten"} {
		t.Setenv("CRASH_SEEDS", v)
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("CRASH_SEEDS=%s accepted", v)
				}
			}()
			Seeds(40)
		}()
	}
}
