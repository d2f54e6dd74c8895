package corpus

import "testing"

func TestFiles(t *testing.T) {
	got := Files(t, "*.seed")
	if len(got) != 2 || string(got[0]) != "a" || string(got[1]) != "bb" {
		t.Fatalf("got %q, want [a bb] in name order", got)
	}
	if none := Files(t, "*.none"); len(none) != 0 {
		t.Fatalf("got %q for a pattern matching nothing", none)
	}
}
