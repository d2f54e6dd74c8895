package rbd

import (
	"reflect"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
)

func TestFillHoles(t *testing.T) {
	d := func(o, l int64) image.Extent { return image.Extent{Offset: o, Length: l, Kind: image.Data} }
	h := func(o, l int64) image.Extent { return image.Extent{Offset: o, Length: l, Kind: image.Hole} }
	cases := []struct {
		data      []image.Extent
		off, len_ int64
		want      []image.Extent
	}{
		{nil, 0, 100, []image.Extent{h(0, 100)}},
		{[]image.Extent{d(10, 10)}, 0, 100, []image.Extent{h(0, 10), d(10, 10), h(20, 80)}},
		// unsorted, adjacent and overlapping runs merge; runs past the
		// range are clipped
		{[]image.Extent{d(50, 60), d(0, 10), d(10, 5)}, 0, 100, []image.Extent{d(0, 15), h(15, 35), d(50, 50)}},
		{[]image.Extent{d(0, 100)}, 40, 20, []image.Extent{d(40, 20)}},
	}
	for i, c := range cases {
		if got := fillHoles(c.data, c.off, c.len_); !reflect.DeepEqual(got, c.want) {
			t.Errorf("case %d: got %v, want %v", i, got, c.want)
		}
	}
}
