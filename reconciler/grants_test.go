package reconciler

import (
	"errors"
	"log/slog"
	"testing"
)

// Persistent grants are offered where grant copy is missing, or as the
// flag says, and only an offered feature reaches the published keys.
func TestOfferPersistent(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	copyOK := HostFacts{Xen: true, GrantCopy: true}
	noCopy := HostFacts{Xen: true}
	failed := HostFacts{Xen: true, GrantCopyErr: errors.New("gntdev grant copy: permission denied")}
	for _, c := range []struct {
		name  string
		mode  PersistentGrants
		local bool
		f     HostFacts
		want  bool
	}{
		{"auto, grant copy", PersistentAuto, false, copyOK, false},
		{"auto, no grant copy", PersistentAuto, false, noCopy, true},
		{"auto, probe failed", PersistentAuto, false, failed, true},
		{"auto, local frontend", PersistentAuto, true, HostFacts{}, true},
		{"on, grant copy", PersistentOn, false, copyOK, true},
		{"off, no grant copy", PersistentOff, false, noCopy, false},
		{"off, local frontend", PersistentOff, true, HostFacts{}, false},
	} {
		if got := offerPersistent(c.mode, c.local, c.f, log); got != c.want {
			t.Errorf("%s: offered %v, want %v", c.name, got, c.want)
		}
	}

	dev := &device{worker: workerState{size: 1 << 20}}
	for _, offer := range []bool{false, true} {
		got := ""
		for _, kv := range diskKeys(dev, snapshot{offerPersistent: offer}) {
			if kv[0] == "feature-persistent" {
				got = kv[1]
			}
		}
		if want := map[bool]string{true: "1"}[offer]; got != want {
			t.Errorf("offered %v: feature-persistent %q, want %q", offer, got, want)
		}
	}
}

func TestParsePersistentGrants(t *testing.T) {
	for in, want := range map[string]PersistentGrants{"": PersistentAuto, "auto": PersistentAuto, "on": PersistentOn, "off": PersistentOff} {
		if got, err := ParsePersistentGrants(in); err != nil || got != want {
			t.Errorf("%q: %q, %v", in, got, err)
		}
	}
	if _, err := ParsePersistentGrants("yes"); err == nil {
		t.Error(`"yes" accepted`)
	}
}
