package guard

import (
	"errors"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
)

// The checks run in the order the formats documented before they shared
// them: closed first, then read-only, then range; each error names the
// image and wraps its class.
func TestGuardOrder(t *testing.T) {
	var g Guard
	g.SetLabel("raw: /x")
	cases := []struct {
		name string
		err  error
		want error
	}{
		{"in range", g.Span(0, 512, 512), nil},
		{"past end", g.Span(1, 512, 512), image.ErrOutOfRange},
		{"negative", g.Span(-1, 1, 512), image.ErrOutOfRange},
		{"read-only beats range", g.Change("write", true, 1, 512, 512), image.ErrReadOnly},
		{"writable past end", g.Change("write", false, 1, 512, 512), image.ErrOutOfRange},
		{"writable in range", g.Change("discard", false, 0, 512, 512), nil},
	}
	for _, c := range cases {
		if !errors.Is(c.err, c.want) || (c.want == nil) != (c.err == nil) {
			t.Errorf("%s: got %v, want %v", c.name, c.err, c.want)
		}
		if c.err != nil && !strings.HasPrefix(c.err.Error(), "raw: /x: ") {
			t.Errorf("%s: %q does not start with the label", c.name, c.err)
		}
	}
	if g.Close() {
		t.Fatal("first Close says already closed")
	}
	if !g.Close() || !g.Closed() {
		t.Fatal("second Close does not say already closed")
	}
	for _, err := range []error{g.Open(), g.Span(0, 0, 512), g.Change("write", true, 1, 512, 512)} {
		if !errors.Is(err, image.ErrClosed) {
			t.Errorf("after Close: got %v, want image.ErrClosed", err)
		}
	}
}
