package main

import "testing"

func TestParseArgs(t *testing.T) {
	for _, c := range []struct {
		args  []string
		name  string
		adopt bool
		bad   bool
	}{
		{args: []string{"__worker", "--name", "d1", "--adopt"}, name: "d1", adopt: true},
		{args: []string{"--name=d2"}, name: "d2"},
		{args: []string{"__worker", "--adopt"}, bad: true},
		{args: []string{"--name"}, bad: true},
		{args: []string{"--name", "d", "--verbose"}, bad: true},
		{args: nil, bad: true},
	} {
		name, adopt, err := parseArgs(c.args)
		if (err != nil) != c.bad || name != c.name && !c.bad || adopt != c.adopt && !c.bad {
			t.Errorf("%q: %q %v %v, want %q %v bad=%v", c.args, name, adopt, err, c.name, c.adopt, c.bad)
		}
	}
}
